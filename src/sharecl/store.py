"""The on-disk store of a continual model: ``manifest.json`` + safetensors, atomic.

A store holds one storable method (:data:`STORABLE`): Share (bases and coefficients),
InfLoRA (each task's merged factors and the DualGPM memory), SD-LoRA (unit directions and
magnitudes) or DualLoRA (merged orthogonal factors, residual bases and up-projections,
memory). PEFT baselines keep their adapters in PEFT's own format and have no store.

Layout of a store directory::

    manifest.json              format, version, method and config, base model (path, sha256),
                               tasks (name, classes, kind), method state that is not a tensor
                               (merge summaries, ranks, memory kinds), file checksums, versions
    state-v<N>-<token>.safetensors  every adapter/memory tensor, and every head (a random token
                               per write: no two writers ever share a file name)
    .lock                      advisory lock held by a writer

Every change takes the store's write lock (:func:`save_store` takes it itself, re-entrantly
when the caller holds it already), writes a new state file (temporary name, fsync, rename),
then the manifest the same way, last. A process killed at any instant leaves either the
previous manifest (pointing at the previous, untouched state file) or the new one. Then the
state files the new manifest does not name, and temporary debris, are removed. Every file is
checked against the sha256 recorded in the manifest before it is read; nothing is ever
unpickled. A new version must run on the store's base model (same weights' sha256).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import threading
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sharecl.provenance import environment, library_versions

__all__ = ["FORMAT", "FORMAT_VERSION", "STORABLE", "StoreError", "StoreLockedError", "compact_merges", "save_store", "load_store", "read_manifest",
           "store_lock", "library_versions"]

FORMAT = "sharecl-store"
FORMAT_VERSION = 1
_STATE = re.compile(r"^state-v(\d+)(?:-[0-9a-f]{8,64})?\.safetensors$")
_HELD = threading.local()  # per thread: {store path: depth} of the write locks this thread holds
#: Methods a store can hold.
STORABLE = ("share", "inflora", "sd-lora", "sd-lora-rr", "sd-lora-kd", "dual-lora")


class StoreError(RuntimeError):
    """A store that cannot be read or written; the message names the problem and the fix."""


class StoreLockedError(StoreError):
    """Another process holds the store's write lock."""


def _sha256(path: Path) -> str:
    from sharecl.backbone import sha256_files

    return sha256_files([path])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
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
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{mf} has format_version {manifest.get('format_version')!r}; this sharecl reads version "
                         f"{FORMAT_VERSION}: use the sharecl release that wrote it")
    state = manifest.get("files", {}).get("state", {})
    name = state.get("name", "")
    if not _STATE.match(name) or Path(name).name != name:
        raise StoreError(f"{mf} points at {name!r}, which is not a state file inside the store; the manifest was tampered with")
    return manifest


def _state_tensors(path: Path, manifest: dict) -> dict[str, torch.Tensor]:
    entry = manifest["files"]["state"]
    f = path / entry["name"]
    if not f.is_file():
        raise StoreError(f"{f} is missing; the store is damaged (restore the directory from a backup)")
    if _sha256(f) != entry["sha256"]:
        raise StoreError(f"{f} does not match its sha256 in the manifest: the file is truncated, corrupted or "
                         f"was replaced; restore the store from a backup")
    try:
        return load_file(str(f))
    except (SafetensorError, OSError) as exc:
        raise StoreError(f"cannot read {f}: {exc}") from exc


def compact_merges(merges: list[dict]) -> list[dict]:
    """Share's merge records as the manifest keeps them: every merge's summary (``k``, kept
    energy, ``drift_mean``/``drift_max`` over old tasks and the ``worst_task``), and the per-task
    drift of the last merge only, so the manifest grows linearly with the number of tasks."""
    out = []
    for i, rec in enumerate(merges):
        per = rec.get("per_task")
        if i == len(merges) - 1 or per is None:
            out.append(rec)
            continue
        summary = {k: v for k, v in rec.items() if k != "per_task"}
        if per:
            worst = max(per, key=lambda n: per[n]["max"])
            summary.update(drift_mean=sum(v["mean"] for v in per.values()) / len(per), drift_max=per[worst]["max"],
                           worst_task=worst)
        out.append(summary)
    return out


def _check_tokenizer(path: Path, recorded: dict | None, current: dict) -> None:
    """Refuse a causal LM whose tokenizer or chat template differ from the ones a store recorded.

    Raises:
        StoreError: naming what differs and the fix.
    """
    if not recorded:
        return  # a store written before tokenizers were recorded
    for key, what in (("tokenizer_sha256", "tokenizer (vocabulary or special tokens)"), ("chat", "use of the chat template"),
                      ("chat_template_sha256", "chat template")):
        if recorded.get(key) != current.get(key):
            raise StoreError(f"{path} was built with another {what} than the model loaded now has: its tasks' prompts "
                             f"would be encoded differently; load it with the tokenizer it was built with (the base "
                             f"model directory as it was)")


def save_store(method, path: str | Path, *, extra: dict | None = None) -> dict:
    """Write ``method`` (a storable method, :data:`STORABLE`) as the next store version.

    Takes the store's write lock (re-entrant: callers may hold it already). Returns the manifest.

    Raises:
        StoreError: if the method has no store format, the store holds another method, or the
            method runs on another base model than the store's.
        StoreLockedError: if another process or thread is writing the store.
    """
    from sharecl.backbone import weights_hash

    if method.name not in STORABLE:
        raise StoreError(f"method {method.name!r} has no store format; stores hold {', '.join(STORABLE)}")
    p = Path(path)
    with store_lock(p):
        previous = read_manifest(p) if (p / "manifest.json").exists() else None
        if previous and previous.get("method") != method.name:
            raise StoreError(f"{p} holds method {previous.get('method')!r}, not {method.name!r}; use another directory")
        sha = weights_hash(method.encoder.path)
        if previous and previous["base_model"]["sha256"] != sha:
            raise StoreError(f"{p} was built on the base model {previous['base_model']['path']} (sha256 "
                             f"{previous['base_model']['sha256'][:12]}…); this method runs on {method.encoder.path} "
                             f"(sha256 {sha[:12]}…), so its tasks would be mislabelled; save it to another directory")
        version = (previous["version"] + 1) if previous else 1
        base = {"path": method.encoder.path, "sha256": sha,
                "model_type": getattr(method.encoder.model.config, "model_type", None)}
        if method.modality == "lm":  # what besides the weights decides a causal LM's answers
            base["tokenizer"] = method.encoder.identity()
            _check_tokenizer(p, (previous or {}).get("base_model", {}).get("tokenizer"), base["tokenizer"])
        state_name = f"state-v{version}-{secrets.token_hex(8)}.safetensors"
        tensors = {k: v.detach().cpu().contiguous() for k, v in method.state_tensors().items()}
        meta = method.state_meta()
        _atomic_write(p / state_name, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt", "version": str(version)}))
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "version": version, "method": method.name,
            "config": method.config.to_dict(), "seed": method.seed, "max_length": method.encoder.max_length,
            "image_size": method.encoder.image_size, "modality": method.modality,
            **({"chat": method.encoder.chat} if method.modality == "lm" else {}),
            "base_model": base, "targets": list(method.layers),
            "tasks": [{"name": n, "classes": method.task_classes[n], "kind": getattr(method, "kinds", {}).get(n, "data"),
                       "head": n in method.heads} for n in method.task_names],
            "merges": compact_merges(getattr(method, "drift", [])),
            "method_state": meta,
            "files": {"state": {"name": state_name, "sha256": _sha256(p / state_name)}},
            "library_versions": library_versions(),
            "environment": environment(),
            **(extra or {}),
        }
        _atomic_write(p / "manifest.json", lambda tmp: tmp.write_text(json.dumps(manifest, indent=2)))
        for f in p.iterdir():  # state files the new manifest does not name, and debris of killed writers
            if (_STATE.match(f.name) and f.name != state_name) or f.name.startswith(".state-v") \
                    or f.name.startswith(".manifest.json.tmp"):
                f.unlink(missing_ok=True)
    return manifest


def load_store(path: str | Path, *, model_path: str | None = None, device: str | torch.device | None = "cpu",
               precision: str = "fp32"):
    """Load a store as a ready method (the one named in the manifest).

    Args:
        model_path: base model directory, if it moved since the store was written; its
            weights must hash to the manifest's ``base_model.sha256``.
        device, precision: where and how the model runs (see :func:`sharecl.backbone.load_encoder`);
            the tensors are the same whatever the device.

    Raises:
        StoreError: see :func:`read_manifest`; a damaged state file; a base model whose
            weights differ from the one the store was built on.
    """
    from sharecl.backbone import load_encoder, weights_hash
    from sharecl.methods import build_method

    p = Path(path)
    manifest = read_manifest(p)
    if manifest.get("method") not in STORABLE:
        raise StoreError(f"{p} holds method {manifest.get('method')!r}; this sharecl stores {', '.join(STORABLE)}")
    base = model_path or manifest["base_model"]["path"]
    if not Path(base).is_dir():
        raise StoreError(f"base model {base} (from the manifest) is missing; pass --model PATH to its new location")
    if weights_hash(base) != manifest["base_model"]["sha256"]:
        raise StoreError(f"base model at {base} differs from the one this store was built on (sha256 mismatch); "
                         f"use the original base model")
    tensors = _state_tensors(p, manifest)
    if manifest.get("modality") == "lm":  # a causal LM with generation tasks
        from sharecl.generation.lm import load_causal_lm

        encoder = load_causal_lm(base, max_length=manifest.get("max_length", 256), device=device, precision=precision,
                                 chat=manifest.get("chat"))
        _check_tokenizer(p, manifest["base_model"].get("tokenizer"), encoder.identity())
    else:
        encoder = load_encoder(base, max_length=manifest.get("max_length", 128), device=device, precision=precision,
                               image_size=manifest.get("image_size") or 56)
    tensors = {k: v.to(encoder.device) for k, v in tensors.items()}
    method = build_method(manifest["method"], encoder, seed=manifest.get("seed", 0), **manifest["config"])
    if list(method.layers) != manifest["targets"]:
        raise StoreError(f"the base model's target layers do not match the store's ({len(method.layers)} vs {len(manifest['targets'])})")
    meta = {**(manifest.get("method_state") or {}), "merges": manifest.get("merges", [])}
    try:
        method.load_state(tensors, manifest["tasks"], meta)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise StoreError(f"{p}: the state file does not match the manifest ({exc}); restore the store from a backup") from exc
    return method
