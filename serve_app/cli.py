"""The ``raygate`` command: ``up``, ``keys``, ``ingest``, ``make-tiny-model``."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from serve_app.auth import KeyStore
from serve_app.stores import REDIS_URL_FILE, redis_client
from training import cli as training_cli


def default_data_dir() -> Path:
    """$RAYGATE_DATA_DIR, else ~/.raygate."""
    return Path(os.environ.get("RAYGATE_DATA_DIR") or "~/.raygate").expanduser().resolve()


def _redis_url(args: argparse.Namespace) -> str:
    """--redis-url, else $REDIS_URL, else the URL `raygate up` recorded in the data dir."""
    url = args.redis_url or os.environ.get("REDIS_URL")
    recorded = default_data_dir() / REDIS_URL_FILE
    if not url and recorded.exists():
        url = recorded.read_text(encoding="utf-8").strip()
    if not url:
        sys.exit("No Redis to talk to: start `raygate up` or set REDIS_URL / --redis-url.")
    return url


async def _keys(args: argparse.Namespace) -> int:
    store = KeyStore(redis_client(_redis_url(args)))
    try:
        if args.keys_command == "create":
            key, record = await store.create(args.tenant, args.user, args.plan, admin=args.admin)
            print(json.dumps({"key": key, **record.model_dump()}, indent=2))
        elif args.keys_command == "revoke":
            record = await store.revoke(args.key)
            print(f"revoked {record.key_id} ({record.tenant}/{record.user})")
        else:
            for record in await store.list():
                print(json.dumps(record.model_dump()))
    finally:
        await store.redis.aclose()
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raygate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start Valkey, Ray and the gateway; Ctrl-C stops all")
    up.add_argument("--config", type=Path, default=Path("serve_config.yaml"))

    keys = sub.add_parser("keys", help="manage API keys")
    keys.add_argument("--redis-url", default=None)
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key (printed once)")
    create.add_argument("--tenant", required=True)
    create.add_argument("--user", required=True)
    create.add_argument("--plan", choices=["free", "premium", "enterprise"], default="free")
    create.add_argument("--admin", action="store_true", help="the key may use /admin routes")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by its id or the key itself")
    revoke.add_argument("key")
    keys_sub.add_parser("list", help="list keys (ids, never secrets)")

    ingest = sub.add_parser("ingest", help="upload a file or folder of documents to a RAG collection")
    ingest.add_argument("path", type=Path)
    ingest.add_argument("--collection", required=True)
    ingest.add_argument("--tenant", default=None, help="act for this tenant (needs an admin key)")
    ingest.add_argument("--url", default=os.environ.get("RAYGATE_URL", "http://127.0.0.1:8000"))
    ingest.add_argument("--api-key", default=os.environ.get("RAYGATE_API_KEY"), help="default $RAYGATE_API_KEY")

    tiny = sub.add_parser("make-tiny-model", help="build the tiny test model offline")
    tiny.add_argument("dir", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    training_cli.add_cli(sub)  # dataset, train, tune, eval, adapters
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``raygate`` console script."""
    args = _parser().parse_args(argv)
    if args.command == "up":
        from serve_app.up import up

        return up(args.config.resolve(), default_data_dir())
    if args.command == "keys":
        return asyncio.run(_keys(args))
    if args.command in training_cli.COMMANDS:
        return training_cli.run_cli(args)
    if args.command == "ingest":
        from serve_app.ingest import ingest

        if not args.api_key:
            sys.exit("raygate ingest needs an API key: --api-key or $RAYGATE_API_KEY.")
        return 1 if ingest(args.path, args.collection, url=args.url, api_key=args.api_key, tenant=args.tenant) else 0
    from deployments.models.tiny import make_tiny_model

    print(make_tiny_model(args.dir, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
