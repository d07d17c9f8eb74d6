"""``raygate ingest PATH --collection NAME``: upload a file or a folder of documents to a collection.

Files go one by one to ``POST /v1/collections/{name}/documents`` as multipart uploads
(the gateway parses PDF and HTML), each under its path relative to PATH as document
id, so running it again replaces rather than duplicates. A progress bar counts files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
from tqdm import tqdm

from deployments.parsing import SUPPORTED


def documents(path: Path) -> list[Path]:
    """The supported files under ``path`` (or ``path`` itself), in a stable order."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED)


def ingest(path: Path, collection: str, *, url: str, api_key: str, tenant: str | None = None,
           timeout_s: float = 300.0) -> int:
    """Upload every document; print a summary; return the number of failures."""
    files = documents(path)
    if not files:
        print(f"No {', '.join(SUPPORTED)} files under {path}.", file=sys.stderr)
        return 1
    params = {"tenant": tenant} if tenant else {}
    headers = {"Authorization": f"Bearer {api_key}"}
    chunks, failures = 0, 0
    root = path if path.is_dir() else path.parent
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s) as client:
        for file in tqdm(files, desc=f"ingest → {collection}", unit="file"):
            doc_id = file.relative_to(root).as_posix()
            response = client.post(f"/v1/collections/{collection}/documents", params=params,
                                   data={"id": doc_id}, files={"file": (file.name, file.read_bytes())})
            if response.status_code == 200:
                chunks += response.json()["chunks"]
            else:
                failures += 1
                tqdm.write(f"{doc_id}: {response.status_code} {_message(response)}", file=sys.stderr)
    print(json.dumps({"collection": collection, "files": len(files) - failures, "chunks": chunks,
                      "failed": failures}))
    return failures


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]
