"""``raygate dataset | train | tune | eval | adapters``: the training loop's commands.

Each command's work lives in its module (``training.dataset``, ``train``, ``tune``,
``evaluate``, ``registry``); this module parses options and prints results.
``serve_app.cli`` adds these commands with :func:`add_cli` and hands them to :func:`run_cli`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import typing
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ValidationError

from serve_app.errors import InvalidRequestError, NotFoundError
from training import evaluate, train, tune
from training.dataset import DatasetConfig, build_dataset
from training.registry import GATEWAY_TIMEOUT_S, METADATA_FILE, AdapterEntry, AdapterRegistry, validate_adapter_name
from training.train import TrainConfig
from training.tune import TuneConfig

__all__ = ["COMMANDS", "add_cli", "add_config_options", "overrides", "run_cli"]

COMMANDS = ("dataset", "train", "tune", "eval", "adapters")


def add_cli(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the training commands to the ``raygate`` parser's sub-commands."""
    _add_dataset(sub)
    _add_train(sub)
    _add_tune(sub)
    _add_eval(sub)
    _add_adapters(sub)


def run_cli(args: argparse.Namespace) -> int:
    """Run the training command ``args.command`` names; returns its exit status."""
    runners = {"dataset": _run_dataset, "train": _run_train, "tune": _run_tune, "eval": _run_eval,
               "adapters": _run_adapters}
    return runners[args.command](args)


def _default_data_dir() -> Path:
    from serve_app.cli import default_data_dir  # lazily: serve_app.cli imports this module

    return default_data_dir()


def _epoch(value: str) -> float:
    """Epoch seconds, or an ISO date/time (UTC unless it says otherwise)."""
    try:
        return float(value)
    except ValueError:
        moment = datetime.fromisoformat(value)
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def _add_dataset(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``raygate dataset build``."""
    dataset = sub.add_parser("dataset", help="build fine-tuning datasets from the ledger")
    build = dataset.add_subparsers(dest="dataset_command", required=True).add_parser(
        "build", help="filter, scrub, deduplicate and split stored conversations into train/validation JSONL")
    build.add_argument("--data-dir", type=Path, default=None, help="default $RAYGATE_DATA_DIR or ~/.raygate")
    build.add_argument("--out", type=Path, default=None, help="default <data-dir>/datasets/<UTC time>")
    build.add_argument("--jsonl", type=Path, action="append", default=[], help="also import this file (repeatable)")
    build.add_argument("--no-ledger", action="store_true", help="read only the --jsonl files")
    build.add_argument("--min-rating", type=int, default=None)
    build.add_argument("--thumbs-up-only", action="store_true")
    build.add_argument("--min-judge-score", type=int, default=None, help="keep answers a judge scored at least this")
    build.add_argument("--min-turns", type=int, default=1, help="user messages per conversation")
    build.add_argument("--languages", default=None, help="comma-separated, e.g. en,fr")
    build.add_argument("--tenant", default=None)
    build.add_argument("--since", type=_epoch, default=None, help="epoch seconds or ISO date/time")
    build.add_argument("--until", type=_epoch, default=None, help="epoch seconds or ISO date/time")
    build.add_argument("--val-fraction", type=float, default=0.1)
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--near-duplicate-threshold", type=float, default=0.9)
    build.add_argument("--no-consent-only", action="store_true", help="also use content kept by default consent")


def _run_dataset(args: argparse.Namespace) -> int:
    """Run ``raygate dataset build`` and print the report.

    Returns:
        0 when examples were written, 1 when none were (or no source could be read), 2 for bad options.
    """
    from rich.console import Console
    from rich.markdown import Markdown

    from serve_app.config import LedgerConfig

    data_dir = args.data_dir or _default_data_dir()
    try:
        config = DatasetConfig(
            min_rating=args.min_rating, thumbs_up_only=args.thumbs_up_only, min_judge_score=args.min_judge_score,
            min_turns=args.min_turns,
            languages=args.languages.split(",") if args.languages else None, consent_only=not args.no_consent_only,
            since=args.since, until=args.until, tenant=args.tenant, validation_fraction=args.val_fraction,
            seed=args.seed, near_duplicate_threshold=args.near_duplicate_threshold)
    except ValidationError as exc:
        print(f"raygate dataset build: {exc}", file=sys.stderr)
        return 2
    ledger: Path | None = None if args.no_ledger else data_dir / LedgerConfig().db_file
    if ledger is not None and not ledger.is_file():
        if not args.jsonl:
            print(f"raygate dataset build: no ledger at {ledger} (and no --jsonl)", file=sys.stderr)
            return 1
        print(f"no ledger at {ledger}: using the --jsonl files only", file=sys.stderr)
        ledger = None
    out = args.out or data_dir / "datasets" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    report = build_dataset(config, out, ledger_path=ledger, jsonl_paths=args.jsonl)
    Console().print(Markdown(report.to_markdown()))
    print(f"dataset {report.dataset_hash}: {report.train} train, {report.validation} validation examples in {out}")
    return 0 if report.examples_out else 1


def _add_adapters(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``raygate adapters {list,register,remove,load,unload}``."""
    adapters = sub.add_parser("adapters", help="manage trained LoRA adapters")
    adapters.add_argument("--data-dir", type=Path, default=None, help="default $RAYGATE_DATA_DIR, else ~/.raygate")
    commands = adapters.add_subparsers(dest="adapters_command", required=True)
    listing = commands.add_parser("list", help="list registered adapters")
    listing.add_argument("--json", action="store_true", help="one JSON object a line instead of a table")
    register = commands.add_parser("register", help="copy a trained adapter dir into the registry")
    register.add_argument("name")
    register.add_argument("dir", type=Path)
    register.add_argument("--overwrite", action="store_true")
    remove = commands.add_parser("remove", help="unregister an adapter and delete its copy")
    remove.add_argument("name")
    remove.add_argument("--force", action="store_true", help="even while loaded on a model")
    for action in ("load", "unload"):
        parser = commands.add_parser(action, help=f"{action} an adapter on a running gateway's model")
        parser.add_argument("name")
        parser.add_argument("--model", required=True, help="the base model's id")
        parser.add_argument("--url", default=os.environ.get("RAYGATE_URL", "http://127.0.0.1:8000"))
        parser.add_argument("--admin-key", default=None, help="default $RAYGATE_ADMIN_KEY")


def _run_adapters(args: argparse.Namespace) -> int:
    """Run a ``raygate adapters`` command; return the exit status.

    Args:
        args: the parsed arguments (``args.adapters_command`` picks the command).

    Returns:
        0 on success, 1 on a refused request or an unreachable gateway.
    """
    try:
        if args.adapters_command in ("load", "unload"):
            return _gateway_call(args)
        registry = AdapterRegistry(args.data_dir or _default_data_dir())
        if args.adapters_command == "register":
            print(registry.register(args.name, args.dir, overwrite=args.overwrite).model_dump_json(indent=2))
        elif args.adapters_command == "remove":
            print(f"removed {registry.remove(args.name, force=args.force).name}")
        elif args.json:
            for entry in registry.list():
                print(entry.model_dump_json())
        else:
            _print_table(registry.list())
    except (InvalidRequestError, NotFoundError) as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    return 0


def _print_table(entries: list[AdapterEntry]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Adapters")
    for column in ("name", "base model", "dataset", "val loss", "loaded on", "registered"):
        table.add_column(column)
    for entry in entries:
        val_loss = entry.metrics.get("val_loss")
        table.add_row(entry.name, entry.base_model, entry.dataset_hash[:12],
                      "" if val_loss is None else f"{val_loss:.4f}", ", ".join(entry.loaded_on) or "-",
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.registered_at)))
    Console().print(table)


def _gateway_call(args: argparse.Namespace) -> int:
    """POST ``/admin/adapters/{name}/{load|unload}``; print the answer or the error's message."""
    import httpx

    validate_adapter_name(args.name)  # it goes into the URL's path
    admin_key = args.admin_key or os.environ.get("RAYGATE_ADMIN_KEY")
    if not admin_key:
        print("error: an admin key is needed: --admin-key or $RAYGATE_ADMIN_KEY.", file=sys.stderr)
        return 1
    url = f"{args.url.rstrip('/')}/admin/adapters/{args.name}/{args.adapters_command}"
    try:
        response = httpx.post(url, json={"model": args.model}, timeout=GATEWAY_TIMEOUT_S,
                              headers={"Authorization": f"Bearer {admin_key}"})
    except httpx.HTTPError as exc:
        print(f"error: cannot reach the gateway at {args.url}: {exc}", file=sys.stderr)
        return 1
    if response.is_error:
        print(f"error: {response.status_code} {_error_message(response)}", file=sys.stderr)
        return 1
    print(response.text)
    return 0


def _error_message(response: httpx.Response) -> str:
    """The message of an OpenAI-shaped error body, else the start of the body."""
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return str(response.text[:200])


def add_config_options(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """Add ``--config`` (YAML) and one ``--field-name`` option per field of ``model``, for overrides.

    Options default to None (unset), so only what the user typed overrides the file;
    values stay strings for pydantic to parse, as it parses the YAML's.
    """
    if not any(a.dest == "config" for a in parser._actions):
        parser.add_argument("--config", type=Path, default=None, help="YAML file with the config; options override it")
    for name, field in model.model_fields.items():
        flag, annotation = "--" + name.replace("_", "-"), field.annotation
        help_text = field.description
        if annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(annotation) is list:
            parser.add_argument(flag, dest=name, nargs="+", default=None, help=help_text)
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            continue  # a nested model: only through --config
        else:
            parser.add_argument(flag, dest=name, default=None, help=help_text)


def overrides(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The options the user gave for ``model``'s fields."""
    return {name: getattr(args, name) for name in model.model_fields if getattr(args, name, None) is not None}


def _add_train(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``raygate train``."""
    parser = sub.add_parser("train", help="fine-tune a LoRA adapter on chat JSONL with Ray Train")
    add_config_options(parser, TrainConfig)
    parser.add_argument("--no-ray", action="store_true", help="run in this process, without a Ray cluster")


def _run_train(args: argparse.Namespace) -> int:
    """Run ``raygate train``: print the result as JSON; 2 on an invalid config."""
    import yaml

    data = yaml.safe_load(args.config.read_text(encoding="utf-8")) if args.config else {}
    try:
        config = TrainConfig.model_validate({**(data or {}), **overrides(args, TrainConfig)})
    except ValidationError as exc:
        print(f"raygate train: invalid config:\n{exc}", file=sys.stderr)
        return 2
    result = train.train(config, use_ray=not args.no_ray)
    print(json.dumps(asdict(result), default=str, indent=2))
    return 0


def _add_tune(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``raygate tune``."""
    parser = sub.add_parser("tune", help="sweep LoRA learning rate and rank with Ray Tune (ASHA)")
    add_config_options(parser, TuneConfig)  # --config (YAML with a train: section) and the sweep's fields
    add_config_options(parser, TrainConfig)  # overrides of the train: section


def _run_tune(args: argparse.Namespace) -> int:
    """Run ``raygate tune``: print the trials and the best adapter as JSON; 2 on an invalid config."""
    import yaml

    data = (yaml.safe_load(args.config.read_text(encoding="utf-8")) if args.config else None) or {}
    data = {**data, **overrides(args, TuneConfig)}
    data["train"] = {**(data.get("train") or {}), **overrides(args, TrainConfig)}
    try:
        config = TuneConfig.model_validate(data)
    except ValidationError as exc:
        print(f"raygate tune: invalid config:\n{exc}", file=sys.stderr)
        return 2
    result = tune.sweep(config)
    print(json.dumps(asdict(result), default=str, indent=2))
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``raygate eval``."""
    parser = sub.add_parser("eval", help="compare a base model with base + LoRA adapter")
    parser.add_argument("adapter", type=Path, help="the adapter dir")
    parser.add_argument("--validation-file", type=Path, required=True)
    parser.add_argument("--base-model", type=Path, default=None,
                        help="default: the base_model recorded in the adapter's raygate_adapter.json")
    parser.add_argument("--question", action="append", default=[], help="repeatable")
    parser.add_argument("--questions-file", type=Path, default=None, help="one question a line")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--output", type=Path, default=None, help=".md or .html; default: Markdown to stdout")


def _run_eval(args: argparse.Namespace) -> int:
    """Run ``raygate eval``: print the report (or write it and print a JSON summary).

    Returns:
        0, or 1 when the inputs are invalid.
    """
    try:
        base_model = args.base_model or _recorded_base_model(args.adapter)
        config = evaluate.EvalConfig(
            base_model=base_model,
            adapter=args.adapter,
            validation_file=args.validation_file,
            questions=args.questions_file if args.questions_file else args.question,
            max_new_tokens=args.max_new_tokens,
            max_length=args.max_length,
            output=args.output,
        )
        result = evaluate.evaluate(config)
    except (ValueError, OSError) as exc:  # pydantic's ValidationError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if result.output is None:
        print(evaluate.render_report(result, "md"))
    else:
        print(json.dumps({"output": result.output, "base": result.base.model_dump(),
                          "adapter": result.tuned.model_dump()}))
    return 0


def _recorded_base_model(adapter: Path) -> str:
    """The base model that ``raygate_adapter.json`` records for ``adapter``."""
    meta = adapter / METADATA_FILE
    try:
        return str(json.loads(meta.read_text(encoding="utf-8"))["base_model"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"no --base-model given and none recorded in {meta}") from exc
