"""Per-task checkpoints of a method's run over a stream, so a stopped run resumes after its last
finished task instead of from the first.

A method learning a stream with :func:`sharecl.runner.run_method` saves itself after every task
but the last in ``OUT/<method>/checkpoint``: a storable method (:func:`sharecl.store.storable_methods`)
as a store, a method with state hooks but no store format (the LoRA baselines:
``ContinualMethod.resumable``) as one safetensors state file named by a ``manifest.json``
(:data:`FORMAT`). Either manifest also carries the run so far under ``"run"`` (the score
matrices' rows, seconds, task infos, sample answers, peak RSS, the method's report and the global
torch RNG state), written atomically after the tensors, so the checkpoint is never half-written:
a run killed while saving resumes from the previous task. The checkpoint is removed once
``results.json`` is written.

Resuming restores the method (:func:`sharecl.store.restore`, or ``load_state`` on a freshly built
method: the exact tensors) on the backbone already loaded, sets the RNG state back and continues
with the next task: the resumed run learns and scores the remaining tasks as an uninterrupted run
would.
"""

from __future__ import annotations

import base64
import json
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch

from sharecl import distributed as dist

__all__ = ["CHECKPOINT_DIR", "FORMAT", "can_checkpoint", "save_checkpoint", "load_checkpoint", "discard_checkpoint"]

CHECKPOINT_DIR = "checkpoint"  # under OUT/<method>/
FORMAT = "sharecl-run-checkpoint"  # the manifest of a method without a store format


def can_checkpoint(method) -> bool:
    """Whether a run of ``method`` (a method class or instance) can be checkpointed per task: a
    storable method, not a joint one, in a single process (under ``torchrun`` a stopped run
    restarts its method)."""
    return bool(method.storable or method.resumable) and not getattr(method, "joint", False) and dist.world_size() == 1


def _identity(method_name: str, stream) -> dict:
    """The run a checkpoint belongs to: the method, the stream's tasks and seed (the budget and
    options are checked as ``compare`` checks a finished run's)."""
    return {"method": method_name, "stream": stream.name, "stream_seed": stream.seed, "tasks": [t.name for t in stream]}


def save_checkpoint(path: Path, method, method_name: str, stream, cfg, done: int, state: dict[str, Any]) -> None:
    """Save ``method`` after ``done`` tasks and the run so far (``state``: JSON-ready lists and
    dicts) as the next version of the checkpoint store at ``path``.

    Raises:
        StoreError: see :func:`sharecl.store.save_store`.
    """
    from sharecl.store import save_store

    rng = base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii")
    run = {**_identity(method_name, stream), "train_config": json.loads(json.dumps(vars(cfg))), "done": done, "torch_rng": rng,
           **state}
    if method.storable:
        save_store(method, path, extra={"run": run})
    else:
        _save_state(path, method, run)


def _save_state(path: Path, method, run: dict) -> None:
    """A method without a store format: its state tensors (``state-<token>.safetensors``), then
    the manifest naming them, each written atomically; older state files are removed after."""
    from safetensors.torch import save_file

    from sharecl.store_format import META, atomic_write, meta_tensor

    path.mkdir(parents=True, exist_ok=True)
    tasks = [{"name": n, "classes": method.task_classes[n]} for n in method.task_names]
    tensors = {k: v.detach().cpu().contiguous() for k, v in method.state_tensors().items()}
    tensors[META] = meta_tensor({"tasks": tasks, "method_state": method.state_meta()})
    name = f"state-{secrets.token_hex(8)}.safetensors"
    atomic_write(path / name, lambda tmp: save_file(tensors, str(tmp)))
    manifest = {"format": FORMAT, "method": method.name, "config": method.config.to_dict(), "seed": method.seed,
                "state": name, "run": run}
    atomic_write(path / "manifest.json", lambda tmp: tmp.write_text(json.dumps(manifest)))
    for f in path.glob("state-*.safetensors"):
        if f.name != name:
            f.unlink(missing_ok=True)


def _load_state(path: Path, manifest: dict, encoder):
    """The method of a :data:`FORMAT` checkpoint, built on ``encoder`` with its saved state."""
    from safetensors.torch import load_file

    from sharecl.methods.registry import build_method
    from sharecl.store_format import pop_meta

    tensors = load_file(str(path / manifest["state"]))
    meta = pop_meta(tensors, path / manifest["state"])
    method = build_method(manifest["method"], encoder, seed=manifest["seed"], **manifest["config"])
    method.load_state({k: v.to(encoder.device) for k, v in tensors.items()}, meta["tasks"], meta["method_state"])
    return method


def load_checkpoint(path: Path, encoder, method_name: str, stream, cfg, method_config: dict) -> tuple[Any, dict] | None:
    """The method restored from the checkpoint at ``path`` on ``encoder`` and the run's state, or
    None where there is no checkpoint. Sets the global torch RNG state to the one saved.

    Raises:
        ValueError: the checkpoint was made with another method, stream, seed, training budget or
            method option: pass another ``--out`` or ``--no-resume``.
        StoreError: a damaged store checkpoint (see :func:`sharecl.store.restore`).
    """
    from sharecl.compare import _check_same_settings
    from sharecl.store import read_manifest, restore

    if not (path / "manifest.json").exists():
        return None
    raw = json.loads((path / "manifest.json").read_text())
    plain = raw.get("format") == FORMAT
    manifest = raw if plain else read_manifest(path)  # a store's manifest is validated as a store
    run = manifest.get("run") or {}
    diff = [k for k, v in _identity(method_name, stream).items() if run.get(k) != v]
    if diff:
        raise ValueError(f"the checkpoint {path} was made with other settings ({', '.join(diff)}); pass another --out, "
                         f"or --no-resume to start this method again")
    # the budget and the method's options, checked as compare checks a finished run's (--align, changed defaults)
    _check_same_settings(path, {"train_config": run.get("train_config", {}), "config": manifest.get("config", {}),
                                "scenario": stream.scenario}, cfg, method_name, method_config)
    method = _load_state(path, manifest, encoder) if plain else restore(path, encoder, manifest)
    state = torch.frombuffer(bytearray(base64.b64decode(run["torch_rng"])), dtype=torch.uint8)
    torch.set_rng_state(state)
    return method, run


def discard_checkpoint(path: Path) -> None:
    """Remove the checkpoint at ``path`` (the run finished, or is started again)."""
    shutil.rmtree(path, ignore_errors=True)
