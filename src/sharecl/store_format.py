"""The store's on-disk format, below any method: the manifest (read and validated), checksums,
atomic writes (temporary name, fsync, rename, fsync the directory), the write lock, and the
JSON ``__meta__`` record inside every safetensors file. :mod:`sharecl.store` writes and reads
methods with these; the layout is described there."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import threading
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

__all__ = ["FORMAT", "FORMAT_VERSION", "StoreError", "StoreLockedError", "store_lock", "read_manifest", "atomic_write",
           "sha256_of", "read_file", "meta_tensor", "pop_meta", "json_of", "STATE_FILE", "LOG_FILE", "META"]

FORMAT = "sharecl-store"
FORMAT_VERSION = 2
_READS = (1, 2)  # format versions this sharecl reads
STATE_FILE = re.compile(r"^state-v(\d+)(?:-[0-9a-f]{8,64})?\.safetensors$")
LOG_FILE = re.compile(r"^log-v(\d+)-[0-9a-f]{8,64}\.safetensors$")
META = "__meta__"  # the JSON byte tensor inside every state and log file
_HELD = threading.local()  # per thread: {store path: depth} of the write locks this thread holds


class StoreError(RuntimeError):
    """A store that cannot be read or written; the message names the problem and the fix."""


class StoreLockedError(StoreError):
    """Another process holds the store's write lock."""


def sha256_of(path: Path) -> str:
    from sharecl.backbone import sha256_files

    return sha256_files([path])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Write ``path`` via ``write(tmp_path)`` to a temporary name, fsync, rename, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # some writers create 0600 files; a store is as readable as the umask allows
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


@contextlib.contextmanager
def store_lock(path: str | Path, wait: bool = False):
    """Hold the store's exclusive write lock (``fcntl.flock`` on ``STORE/.lock``).

    Re-entrant within one thread (``save_store`` inside ``with store_lock(...)`` does not
    deadlock); another thread or process is refused (or waits, with ``wait``).

    Raises:
        StoreLockedError: if another process or thread holds it and ``wait`` is False.
        StoreError: if ``path`` exists and is not a directory.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise StoreError(f"{p} is a file, not a store directory; pass a directory path (a new name creates a store)")
    key = str(p.resolve())
    held = _HELD.__dict__.setdefault("depth", {})
    if held.get(key):
        held[key] += 1
        try:
            yield
        finally:
            held[key] -= 1
        return
    p.mkdir(parents=True, exist_ok=True)
    fh = open(p / ".lock", "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError as exc:
            raise StoreLockedError(f"store {p} is being written by another process; wait for it to finish and retry") from exc
        held[key] = 1
        try:
            yield
        finally:
            held.pop(key, None)
    finally:
        fh.close()


def read_manifest(path: str | Path) -> dict:
    """Read and validate ``STORE/manifest.json``.

    Raises:
        StoreError: no store, unreadable JSON, unknown format or version, or file entries
            that point outside the store directory.
    """
    p = Path(path)
    mf = p / "manifest.json"
    if not mf.is_file():
        raise StoreError(f"{p} is not a sharecl store (no manifest.json); create one with `sharecl learn {p} --task NAME --data FILE`")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(f"{mf} is not valid JSON ({exc}); restore it from a backup") from exc
    if manifest.get("format") != FORMAT:
        raise StoreError(f"{mf} is not a sharecl store manifest (format={manifest.get('format')!r})")
    if manifest.get("format_version") not in _READS:
        raise StoreError(f"{mf} has format_version {manifest.get('format_version')!r}; this sharecl reads versions "
                         f"{', '.join(map(str, _READS))}: use the sharecl release that wrote it")
    files = manifest.get("files", {})
    name = files.get("state", {}).get("name", "")
    if not STATE_FILE.match(name) or Path(name).name != name:
        raise StoreError(f"{mf} points at {name!r}, which is not a state file inside the store; the manifest was tampered with")
    for entry in files.get("log", []):
        if not LOG_FILE.match(entry.get("name", "")) or Path(entry["name"]).name != entry["name"]:
            raise StoreError(f"{mf} points at {entry.get('name')!r}, which is not a log file inside the store; the "
                             f"manifest was tampered with")
    return manifest


def read_file(path: Path, entry: dict) -> dict[str, torch.Tensor]:
    """A state or log file's tensors, after checking it against its sha256 in the manifest."""
    f = path / entry["name"]
    if not f.is_file():
        raise StoreError(f"{f} is missing; the store is damaged (restore the directory from a backup)")
    if sha256_of(f) != entry["sha256"]:
        raise StoreError(f"{f} does not match its sha256 in the manifest: the file is truncated, corrupted or "
                         f"was replaced; restore the store from a backup")
    try:
        return load_file(str(f))
    except (SafetensorError, OSError) as exc:
        raise StoreError(f"cannot read {f}: {exc}") from exc


def meta_tensor(meta: dict) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)


def pop_meta(tensors: dict[str, torch.Tensor], where: Path) -> dict:
    raw = tensors.pop(META, None)
    if raw is None:
        raise StoreError(f"{where} has no {META} record; the store is damaged (restore it from a backup)")
    return json_of(raw)


def json_of(raw: torch.Tensor) -> dict:
    return json.loads(raw.numpy().tobytes().decode())


