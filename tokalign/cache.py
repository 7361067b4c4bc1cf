"""Content-addressed, crash-safe stage outputs.

An entry lives at ``<cache_dir>/<stage>/<key>/`` where ``key`` hashes the stage's own config
values and the keys of the entries it reads. A stage writes into ``<key>.partial/``; when it
returns, a ``manifest.json`` with the sha256 of every file is written last and the folder is
renamed into place. An entry is trusted only if its manifest verifies; anything else is
recomputed. A file lock serialises two jobs that want the same missing entry.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "manifest.json"


def stable_hash(obj: Any, n: int = 16) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys), first ``n`` hex digits."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def write_manifest(entry: Path, extra: dict | None = None) -> dict:
    """Checksum every file under ``entry`` (but the manifest) and write the manifest last."""
    files = {}
    for p in sorted(entry.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[str(p.relative_to(entry))] = {"sha256": file_sha256(p), "bytes": p.stat().st_size}
    manifest = {"files": files, "created": time.time(), **(extra or {})}
    tmp = entry / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, entry / MANIFEST)
    return manifest


def verify(entry: Path, deep: bool = True) -> bool:
    """True when ``entry`` has a manifest and every listed file exists with its size (and checksum when deep)."""
    mf = entry / MANIFEST
    if not mf.is_file():
        return False
    try:
        manifest = json.loads(mf.read_text())
        for rel, info in manifest["files"].items():
            p = entry / rel
            if not p.is_file() or p.stat().st_size != info["bytes"]:
                return False
            if deep and file_sha256(p) != info["sha256"]:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def read_manifest(entry: Path) -> dict:
    return json.loads((entry / MANIFEST).read_text())


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if needed), released on exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def publish(partial: Path, final: Path, extra: dict | None = None) -> None:
    """Write the manifest into ``partial`` and rename it to ``final`` (replacing a broken one)."""
    write_manifest(partial, extra)
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
