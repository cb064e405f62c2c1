"""The store version a server answers with, swapped atomically when a newer one lands on disk."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Loaded", "StoreWatcher"]


@dataclass(frozen=True)
class Loaded:
    """One loaded store version: the method and what the API needs to know about its tasks."""

    version: int
    method: Any  # a ContinualMethod
    classes: dict[str, list[str]]
    kinds: dict[str, str]
    has_head: frozenset[str]
    signature: tuple = ()


def _signature(path: Path) -> tuple:
    st = (path / "manifest.json").stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


def _load(path: Path, device: str, precision: str = "fp32", top_tasks: int | None = None) -> Loaded:
    from sharecl.store import load_store, read_manifest, store_version

    sig = _signature(path)
    manifest = read_manifest(path)
    method = load_store(path, device=device, precision=precision)
    if store_version(method) != manifest["version"]:  # a newer manifest landed between the two reads
        raise RuntimeError("the store changed while it was being read")
    if top_tasks is not None:
        from sharecl.methods.share_cil import set_top_tasks

        set_top_tasks(method, top_tasks)
    return Loaded(manifest["version"], method, {t: list(method.task_classes[t]) for t in method.task_names},
                  {t: method.task_origin(t) for t in method.task_names},
                  frozenset(t for t in method.task_names if t in method.heads), sig)


class StoreWatcher:
    """Holds the served store version and polls ``manifest.json`` for a newer one.

    A new manifest is loaded and checked in the background, then one reference is swapped: a
    batch always runs on one snapshot. A manifest that fails to load is remembered by its
    signature (inode, mtime, size): it is logged once, retried with an exponential back-off
    (``interval_s`` doubling up to ``max_backoff_s``), and the last good version keeps answering;
    a manifest that changes again is tried at the next poll. :attr:`reload_error` says what
    failed (``/health`` shows it).

    ``top_tasks``: answer requests without a task id under each input's M likeliest tasks only
    (``ShareConfig.cil_top_tasks``; aligned Share stores).

    Raises (constructor):
        StoreError: if the store cannot be loaded now.
        ValueError: ``top_tasks`` on a store that is not an aligned Share store.
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu", interval_s: float = 1.0, log=None, precision: str = "fp32",
                 max_backoff_s: float = 300.0, top_tasks: int | None = None):
        self.path, self.device, self.interval_s, self.log, self.precision = Path(path), device, interval_s, log, precision
        self.max_backoff_s, self.top_tasks = max_backoff_s, top_tasks
        self._current = _load(self.path, device, precision, top_tasks)
        self.reloads, self.failed_reloads = 0, 0
        self.reload_error: dict | None = None  # {"signature", "error", "attempts", "retry_at"} of the failing manifest
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def current(self) -> Loaded:
        """The served version (one reference read: a consistent snapshot)."""
        return self._current

    def check(self, now: float | None = None) -> bool:
        """Load and switch to a newer version if the manifest changed; returns whether it switched."""
        now = time.monotonic() if now is None else now
        try:
            sig = _signature(self.path)
        except OSError as exc:
            return self._failed(None, exc, now)
        if sig == self._current.signature:
            return False
        err = self.reload_error
        if err is not None and err["signature"] == sig and now < err["retry_at"]:
            return False  # the same broken manifest: wait for the back-off
        try:
            new = _load(self.path, self.device, self.precision, self.top_tasks)
        except Exception as exc:  # noqa: BLE001 - any failure keeps the old version serving
            return self._failed(sig, exc, now)
        self.reload_error = None
        if new.version <= self._current.version:
            self._current = dataclasses.replace(self._current, signature=new.signature)  # same version, newer file
            return False
        self._current = new
        self.reloads += 1
        if self.log:
            self.log(f"serving store version {new.version} ({len(new.classes)} tasks)")
        return True

    def _failed(self, sig, exc: Exception, now: float) -> bool:
        self.failed_reloads += 1
        prev = self.reload_error
        attempts = prev["attempts"] + 1 if prev is not None and prev["signature"] == sig else 1
        wait = min(self.max_backoff_s, max(self.interval_s, 0.5) * 2 ** (attempts - 1))
        self.reload_error = {"signature": sig, "error": f"{type(exc).__name__}: {exc}", "attempts": attempts,
                             "retry_at": now + wait}
        if self.log and attempts == 1:
            self.log(f"store reload failed, still serving version {self._current.version}: {exc} "
                     f"(retrying with back-off; fix or rewrite the store)")
        return False

    def health(self) -> dict | None:
        """JSON-ready state of the last failed reload, or None when the newest manifest is served."""
        err = self.reload_error
        if err is None:
            return None
        return {"error": err["error"], "attempts": err["attempts"],
                "retry_in_s": round(max(0.0, err["retry_at"] - time.monotonic()), 1)}

    def start(self) -> None:
        if self.interval_s <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="sharecl-store-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
