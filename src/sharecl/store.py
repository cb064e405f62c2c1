"""The on-disk store of a continual model: ``manifest.json`` + safetensors, atomic.

A store holds one storable method (:func:`storable_methods`): Share (bases and coefficients),
InfLoRA (each task's merged factors and the DualGPM memory), SD-LoRA (unit directions and
magnitudes) or DualLoRA (merged orthogonal factors, residual bases and up-projections,
memory). PEFT baselines keep their adapters in PEFT's own format and have no store.

Layout of a store directory (format 2)::

    manifest.json              format, version, method and config, base model (path, sha256),
                               task count, the last merge's summary, the files below with their
                               sha256 and sizes, library versions: a size that does not grow
                               with the number of tasks
    state-v<N>-<token>.safetensors  a checkpoint: every tensor of the method (adapters, memory,
                               heads) and, as a JSON byte tensor ``__meta__``, the task list, the
                               merge records and the method's other state
    log-v<N>-<token>.safetensors    Share only: what versions after the checkpoint appended,
                               in order (each merge's change of basis and new task, the current
                               bases, the new tasks' heads; :mod:`sharecl.coeff_log`) and their
                               tasks and merges in ``__meta__``
    .lock                      advisory lock held by a writer

Adding a Share task appends one log file (the bases, ``k²`` numbers per layer and side, the new
task): its bytes do not grow with the number of tasks. When the log outgrows the checkpoint (or
holds :data:`~sharecl.methods.share.LOG_STEPS_MAX` merges) the next write folds it into a new
checkpoint, so the work of a write stays proportional to one task on average and a load reads at
most about twice the checkpoint. Other methods write a checkpoint every time.

Every change takes the store's write lock (:func:`save_store` takes it itself, re-entrantly
when the caller holds it already), writes the new file (temporary name, fsync, rename), then
the manifest the same way, last. A process killed at any instant leaves either the previous
manifest (naming only files that are untouched) or the new one. Then the files the new manifest
does not name, and temporary debris, are removed. Every file is checked against the sha256
recorded in the manifest before it is read; nothing is ever unpickled. A new version must run
on the store's base model (same weights' sha256). Format 1 stores (one state file, tasks in the
manifest) still load; their next write is a format 2 checkpoint.
"""

from __future__ import annotations

import json
import secrets
import weakref
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sharecl.merges import compact_merges, merge_summary
from sharecl.provenance import environment, library_versions
from sharecl.store_format import (  # noqa: F401 (the format's names are part of this module's interface)
    FORMAT,
    FORMAT_VERSION,
    LOG_FILE,
    META,
    STATE_FILE,
    StoreError,
    StoreLockedError,
    atomic_write,
    json_of,
    meta_tensor,
    pop_meta,
    read_file,
    read_manifest,
    sha256_of,
    store_lock,
)

__all__ = ["FORMAT", "FORMAT_VERSION", "storable_methods", "StoreError", "StoreLockedError", "compact_merges", "save_store",
           "load_store", "restore", "store_version", "AppendableLog", "read_manifest", "store_records", "store_tasks",
           "store_lock", "library_versions"]

#: Methods a store can hold.
def storable_methods() -> tuple[str, ...]:
    """The registered methods with a store format (``storable = True`` on the class)."""
    from sharecl.methods.registry import methods_where

    return tuple(methods_where(storable=True))


def __getattr__(name: str):
    if name == "STORABLE":  # the registry decides (storable_methods); kept as a name for callers
        return storable_methods()
    raise AttributeError(f"module 'sharecl.store' has no attribute {name!r}")


def _read_all(path: Path, manifest: dict) -> tuple[dict[str, torch.Tensor], list[dict], dict]:
    """Every tensor of the store as one dict (checkpoint first, then the log files in order, later
    keys replacing earlier ones: the newest bases win), the task list and the method's meta."""
    files = manifest["files"]
    tensors = read_file(path, files["state"])
    if manifest.get("format_version", 1) == 1:
        return tensors, manifest["tasks"], {**(manifest.get("method_state") or {}), "merges": manifest.get("merges", [])}
    meta = pop_meta(tensors, path / files["state"]["name"])
    tasks, merges, state = list(meta["tasks"]), list(meta["merges"]), dict(meta["method_state"])
    drift = None  # the newest log file's per-task drift of its last merge
    for entry in files.get("log", []):
        part = read_file(path, entry)
        m = pop_meta(part, path / entry["name"])
        tasks += m["tasks"]
        if merges and drift is None:  # only the newest merge keeps its per-task drift
            merges[-1] = merge_summary(merges[-1])
        merges += m["merges"]
        drift = part.pop("merge.drift_mean").tolist(), part.pop("merge.drift_max").tolist()
        for key, value in m["method_state"].items():
            if isinstance(value, dict):
                state.setdefault(key, {}).update(value)
            else:
                state[key] = value
        tensors.update(part)
    if drift is not None:
        merges[-1] = {**merges[-1], "per_task": {t["name"]: {"mean": a, "max": b} for t, a, b in zip(tasks, *drift)}}
    return tensors, tasks, {**state, "merges": merges}


def store_records(path: str | Path, manifest: dict | None = None) -> tuple[list[dict], list[dict]]:
    """A store's task entries in order (name, classes, kind, head, …) and its merge summaries,
    read without loading the model: from the manifest (format 1) or the ``__meta__`` records of
    its files (format 2), each file checked against its sha256 first.

    Raises:
        StoreError: see :func:`read_manifest`; a missing or damaged file.
    """
    p = Path(path)
    manifest = manifest or read_manifest(p)
    if manifest.get("format_version", 1) == 1:
        return manifest["tasks"], [merge_summary(r) for r in manifest.get("merges", [])]
    tasks, merges = [], []
    for entry in [manifest["files"]["state"], *manifest["files"].get("log", [])]:
        f = p / entry["name"]
        if not f.is_file() or sha256_of(f) != entry["sha256"]:
            raise StoreError(f"{f} is missing or does not match its sha256 in the manifest; restore the store from a backup")
        with safe_open(str(f), framework="pt") as fh:
            meta = json_of(fh.get_tensor(META))
        tasks += meta["tasks"]
        merges += [merge_summary(r) for r in meta["merges"]]
    return tasks, merges


def store_class_statistics(path: str | Path, manifest: dict | None = None) -> dict[str, str]:
    """Which tasks keep class statistics for classifier alignment (``--align``), read from the
    files' tensor names and shapes without loading them: ``{task: "full covariances"}`` or
    ``{task: "rank R + diagonal"}``; tasks without statistics are absent.

    Raises:
        StoreError: see :func:`read_manifest`; a file that cannot be opened.
    """
    p = Path(path)
    manifest = manifest or read_manifest(p)
    out: dict[str, str] = {}
    for entry in [manifest["files"]["state"], *manifest["files"].get("log", [])]:
        try:
            with safe_open(str(p / entry["name"]), framework="pt") as fh:
                for key in fh.keys():
                    if key.startswith("classstats.") and key.endswith(".cov"):
                        out[key[len("classstats."):-len(".cov")]] = "full covariances"
                    elif key.startswith("classstats.") and key.endswith(".cov_factor"):
                        rank = fh.get_slice(key).get_shape()[-1]
                        out[key[len("classstats."):-len(".cov_factor")]] = f"rank {rank} + diagonal"
        except (SafetensorError, OSError) as exc:
            raise StoreError(f"cannot read {p / entry['name']}: {exc}") from exc
    return out


def store_tasks(path: str | Path, manifest: dict | None = None) -> list[dict]:
    """A store's task entries in order; see :func:`store_records`."""
    return store_records(path, manifest)[0]


def _drift_tensors(rec: dict) -> dict[str, torch.Tensor]:
    """The last merge's per-task drift as two float32 tensors (old tasks in order), for a log file."""
    per = rec.get("per_task") or {}
    return {"merge.drift_mean": torch.tensor([v["mean"] for v in per.values()], dtype=torch.float32),
            "merge.drift_max": torch.tensor([v["max"] for v in per.values()], dtype=torch.float32)}


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


def _task_entry(method, name: str) -> dict:
    return {"name": name, "classes": method.task_classes[name], "kind": method.task_origin(name),
            "head": name in method.heads}


@runtime_checkable
class AppendableLog(Protocol):
    """A method whose store grows by appending its merges since a version (Share): the store
    writes :meth:`log_tensors` ``(start)`` instead of a checkpoint when it can."""

    log_epoch: int

    def log_steps(self) -> int: ...

    def log_tensors(self, start: int) -> tuple[dict[str, torch.Tensor], list[str]]: ...


#: method → (store path, version, log epoch, log steps) of the store version it was last loaded from or
#: saved to: kept here, never as an attribute set on the method
_LINKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _link(method, key: str, version: int) -> None:
    appendable = isinstance(method, AppendableLog)
    _LINKS[method] = (key, version, method.log_epoch if appendable else 0, method.log_steps() if appendable else 0)


def store_version(method) -> int | None:
    """The store version ``method`` was last loaded from or saved to (None: neither)."""
    link = _LINKS.get(method)
    return link[1] if link else None


def _last_merge(method) -> dict | None:
    drift = getattr(method, "drift", [])
    return merge_summary(drift[-1]) if drift else None


def _can_append(method, key: str, previous: dict | None) -> bool:
    """Whether ``method`` holds exactly the store's state plus merges logged since (Share)."""
    link = _LINKS.get(method)
    return (isinstance(method, AppendableLog) and previous is not None and previous.get("format_version") == 2
            and link is not None and link[:3] == (key, previous["version"], method.log_epoch)
            and method.log_steps() > link[3])


def _outgrows(files: dict, tensors: dict[str, torch.Tensor], method) -> bool:
    """Whether appending ``tensors`` would make the log at least as big as the checkpoint, or
    longer than :data:`~sharecl.methods.share.LOG_STEPS_MAX` merges: then a checkpoint is
    written instead, which keeps the average bytes of a write proportional to one task."""
    from sharecl.methods.share import LOG_STEPS_MAX

    header = sum(len(k) + 80 for k in tensors)  # safetensors' JSON header: name, dtype, shape, offsets per tensor
    log = sum(e["bytes"] for e in files.get("log", [])) + sum(v.numel() * v.element_size() for v in tensors.values()) + header
    return log >= files["state"].get("bytes", 0) or method.log_steps() > LOG_STEPS_MAX


def save_store(method, path: str | Path, *, extra: dict | None = None, compact: bool | None = None) -> dict:
    """Write ``method`` (a storable method, :func:`storable_methods`) as the next store version.

    A Share method that was loaded from (or last saved to) this store's current version appends
    its new merges as one log file; anything else writes a checkpoint. Takes the store's write
    lock (re-entrant: callers may hold it already). Returns the manifest.

    Args:
        extra: JSON-ready fields added to the manifest.
        compact: True: write a checkpoint even where a log file would do; False: append whenever
            possible; None (default): write a checkpoint instead once the log would outgrow the
            checkpoint (see the module docstring).

    Raises:
        StoreError: if the method has no store format, the store holds another method, or the
            method runs on another base model than the store's.
        StoreLockedError: if another process or thread is writing the store.
    """
    from sharecl.backbone import weights_hash

    if not method.storable:
        raise StoreError(f"method {method.name!r} has no store format; stores hold {', '.join(storable_methods())}")
    p = Path(path)
    key = str(p.resolve())
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
        token = secrets.token_hex(8)
        tensors = None
        if compact is not True and _can_append(method, key, previous):
            start = _LINKS[method][3]
            assert previous is not None  # _can_append checked it
            tensors, new = method.log_tensors(start)
            steps = method.log_steps() - start
            kinds = {n: method.task_origin(n) for n in new}
            meta = {"tasks": [_task_entry(method, n) for n in new], "merges": [merge_summary(r) for r in method.drift[-steps:]],
                    "method_state": {**method.state_meta(), "kinds": kinds}}
            tensors.update(_drift_tensors(method.drift[-1]))
            tensors[META] = meta_tensor(meta)
            if compact is None and _outgrows(previous["files"], tensors, method):
                tensors = None  # fold the log into a checkpoint instead
        if tensors is not None:
            assert previous is not None
            name = f"log-v{version}-{token}.safetensors"
            files = {"state": previous["files"]["state"], "log": list(previous["files"].get("log", []))}
        else:
            tensors = method.state_tensors()  # Share folds its coefficient logs into this checkpoint
            meta = {"tasks": [_task_entry(method, n) for n in method.task_names],
                    "merges": compact_merges(getattr(method, "drift", [])), "method_state": method.state_meta()}
            name = f"state-v{version}-{token}.safetensors"
            files = {"log": []}
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        tensors[META] = meta_tensor(meta)
        atomic_write(p / name, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt", "version": str(version)}))
        entry = {"name": name, "sha256": sha256_of(p / name), "bytes": (p / name).stat().st_size}
        if name.startswith("log-"):
            files["log"].append(entry)
        else:
            files["state"] = entry
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "version": version, "method": method.name,
            "config": method.config.to_dict(), "seed": method.seed, "max_length": method.encoder.max_length,
            "image_size": method.encoder.image_size, "modality": method.modality,
            **({"chat": method.encoder.chat} if method.modality == "lm" else {}),
            "base_model": base, "targets": list(method.layers),
            "task_count": len(method.task_names), "last_merge": _last_merge(method),
            "files": files,
            "library_versions": library_versions(),
            "environment": environment(),
            **(extra or {}),
        }
        atomic_write(p / "manifest.json", lambda tmp: tmp.write_text(json.dumps(manifest, indent=2)))
        live = {files["state"]["name"], *(e["name"] for e in files["log"])}
        for f in p.iterdir():  # files the new manifest does not name, and debris of killed writers
            if ((STATE_FILE.match(f.name) or LOG_FILE.match(f.name)) and f.name not in live) or f.name.startswith(".state-v") \
                    or f.name.startswith(".log-v") or f.name.startswith(".manifest.json.tmp"):
                f.unlink(missing_ok=True)
        _link(method, key, version)
    return manifest


def load_store(path: str | Path, *, model_path: str | None = None, device: str | torch.device | None = "cpu",
               precision: str = "fp32"):
    """Load a store as a ready method (the one named in the manifest).

    Args:
        model_path: base model directory, if it moved since the store was written; its
            weights must hash to the manifest's ``base_model.sha256``.
        device: where the model runs (see :func:`sharecl.backbone.load_encoder`); the tensors
            are the same whatever the device.
        precision: ``fp32``, ``bf16`` or ``auto`` (:func:`sharecl.distributed.resolve_precision`).

    Raises:
        StoreError: see :func:`read_manifest`; a damaged state file; a base model whose
            weights differ from the one the store was built on.
    """
    from sharecl.backbone import Backbone, load_encoder, weights_hash

    p = Path(path)
    manifest = read_manifest(p)
    if manifest.get("method") not in storable_methods():
        raise StoreError(f"{p} holds method {manifest.get('method')!r}; this sharecl stores {', '.join(storable_methods())}")
    base = model_path or manifest["base_model"]["path"]
    if not Path(base).is_dir():
        raise StoreError(f"base model {base} (from the manifest) is missing; pass --model PATH to its new location")
    if weights_hash(base) != manifest["base_model"]["sha256"]:
        raise StoreError(f"base model at {base} differs from the one this store was built on (sha256 mismatch); "
                         f"use the original base model")
    tensors, tasks, meta = _read_all(p, manifest)
    encoder: Backbone
    if manifest.get("modality") == "lm":  # a causal LM with generation tasks
        from sharecl.generation.lm import load_causal_lm

        encoder = lm = load_causal_lm(base, max_length=manifest.get("max_length", 256), device=device, precision=precision,
                                 chat=manifest.get("chat"))
        _check_tokenizer(p, manifest["base_model"].get("tokenizer"), lm.identity())
    else:
        encoder = load_encoder(base, max_length=manifest.get("max_length", 128), device=device, precision=precision,
                               image_size=manifest.get("image_size") or 56)
    return restore(p, encoder, manifest, tensors, tasks, meta)


def restore(path: str | Path, encoder, manifest: dict | None = None, tensors=None, tasks=None, meta=None):
    """Build the store's method on ``encoder`` (a loaded backbone of the store's base model, e.g.
    a model the user wrapped: :func:`sharecl.from_pretrained`) and load its state.

    Raises:
        StoreError: the base model's target layers or the state file do not match the manifest.
    """
    from sharecl.methods import build_method

    p = Path(path)
    manifest = manifest or read_manifest(p)
    if tensors is None:
        tensors, tasks, meta = _read_all(p, manifest)
    tensors = {k: v.to(encoder.device) for k, v in tensors.items()}
    method = build_method(manifest["method"], encoder, seed=manifest.get("seed", 0), **manifest["config"])
    if list(method.layers) != manifest["targets"]:
        raise StoreError(f"the base model's target layers do not match the store's ({len(method.layers)} vs {len(manifest['targets'])})")
    try:
        method.load_state(tensors, tasks, meta)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise StoreError(f"{p}: the state file does not match the manifest ({exc}); restore the store from a backup") from exc
    _link(method, str(p.resolve()), manifest["version"])
    return method
