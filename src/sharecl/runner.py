"""Run methods over a task stream and write what a researcher reads.

For each method: learn the stream's tasks in order, evaluate every task seen so far after
each one (the accuracy matrix), and write ``OUT/<method>/results.json`` and
``OUT/<method>/accuracy_matrix.png``; a method with a store format (Share) also writes
``OUT/<method>/store``.
``OUT/manifest.json`` records the stream (classes, sizes, seed), configs and versions.
"""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from sharecl import distributed as dist
from sharecl import resume as resume_mod
from sharecl.backbone import load_encoder
from sharecl.data.tasks import Stream, Task
from sharecl.methods.registry import METHODS, build_method
from sharecl.metrics import forward_transfer, summarize
from sharecl.objectives import objective_of
from sharecl.plots import accuracy_heatmap
from sharecl.provenance import environment
from sharecl.train import PeakRSS, TrainConfig, evaluate, evaluate_many

__all__ = ["run_method", "run_stream", "evaluate_cil", "load_backbone"]

BYTES_PER_NUMBER = 4  # float32 storage


def evaluate_cil(method, task, offset: int, batch_size: int) -> float:
    """Class-incremental accuracy (fraction) on ``task``'s test split: the argmax of
    ``method.cil_logits`` over every class seen must be ``offset + label``."""
    return evaluate(method.cil_logits, task, batch_size, offset=offset)


def _score(method, task, cfg: TrainConfig, samples: dict | None = None) -> float:
    """Task-incremental score of one task, by its objective (:mod:`sharecl.objectives`): accuracy,
    or a generation task's metric over the answers generated under it (the first answers kept in
    ``samples``)."""
    return objective_of(task).score(method, task, cfg.eval_batch_size, samples)


def _rows(method, stream: Stream, upto: int, cfg: TrainConfig, samples: dict | None = None,
          previous: list[float | None] | None = None) -> tuple[list[float], list[float] | None]:
    """TIL scores of tasks ``0..upto``, and CIL accuracies on a class-incremental stream. On a
    task-incremental stream a method with :attr:`~sharecl.methods.base.ContinualMethod.isolated_tasks`
    scores only the new task and keeps the ``previous`` row's scores of the others."""
    seen = stream.tasks[: upto + 1]
    kept = [x for x in (previous or [])[:upto] if x is not None]
    if stream.scenario != "cil" and method.isolated_tasks and len(kept) == upto:
        return [*kept, _score(method, seen[-1], cfg, samples)], None
    if stream.scenario == "cil" and method.one_forward_til_and_cil:
        offsets = method.class_offsets()  # one backbone forward gives both scores
        both = [evaluate_many(functools.partial(method.til_and_cil_logits, task_name=t.name), t, cfg.eval_batch_size,
                              [0, offsets[t.name]]) for t in seen if isinstance(t, Task)]  # class-incremental: classification
        return [b[0] for b in both], [b[1] for b in both]
    til = [_score(method, t, cfg, samples) for t in seen]
    if stream.scenario != "cil":
        return til, None
    offsets = method.class_offsets()
    return til, [evaluate_cil(method, t, offsets[t.name], cfg.eval_batch_size) for t in seen]


def _json_safe(x):
    """NaN → None, recursively (JSON has no NaN)."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


EVALUATE = ("each", "last")


def run_method(method_name: str, stream: Stream, cfg: TrainConfig, out_dir: Path, *, model_path: str | None = None,
               method_config: dict | None = None, progress: bool = True, log=print, device: str | None = "cpu",
               precision: str = "fp32", evaluate: str = "each", resume: bool = False) -> dict:
    """Learn ``stream`` with one method; returns the results dict (also written to JSON).

    On a class-incremental stream ``accuracy_matrix`` holds class-incremental accuracies (no
    task id) and ``til_accuracy_matrix`` the task-incremental ones; on a task-incremental
    stream ``accuracy_matrix`` is task-incremental. A joint method (``joint-lora``) learns all
    tasks at once and fills only the last row.

    ``evaluate="last"`` evaluates only after the last task, as for joint training: only the
    matrices' last rows are filled, so only the final average accuracy is known (the other
    metrics are None). Evaluating is read-only, so that row equals the one ``"each"`` gives; it
    saves the ``T(T+1)/2 − T`` earlier task evaluations (``compare``'s learning-rate tuning, which
    reads only the final accuracy, uses it).

    A storable or resumable method (``ContinualMethod.resumable``: the LoRA baselines) saves a
    checkpoint after every task but the last (:mod:`sharecl.resume`, ``OUT/<method>/checkpoint``,
    removed at the end); with ``resume`` a run that was stopped continues after the last task its
    checkpoint holds, else an old checkpoint is discarded.

    Under ``torchrun`` every rank trains and evaluates its shard (:mod:`sharecl.distributed`);
    only rank 0 logs and writes files. ``device`` and ``precision`` are
    :func:`sharecl.backbone.load_encoder`'s.

    Raises:
        UnsupportedScenarioError: if the method does not support the stream's scenario.
        ValueError: ``evaluate`` not in :data:`EVALUATE`; a checkpoint to resume made with other
            settings (:func:`sharecl.resume.load_checkpoint`).
    """
    if evaluate not in EVALUATE:
        raise ValueError(f"evaluate must be one of {EVALUATE}, got {evaluate!r}")
    torch.manual_seed(cfg.seed)
    encoder = load_backbone(stream, model_path, cfg, device=device, precision=precision)
    if not dist.is_main():
        log = _quiet
    ckpt = out_dir / method_name / resume_mod.CHECKPOINT_DIR
    checkpoint = resume_mod.can_checkpoint(METHODS[method_name])
    found = resume_mod.load_checkpoint(ckpt, encoder, method_name, stream, cfg, method_config or {}) \
        if checkpoint and resume else None
    if found is None:
        if checkpoint:
            resume_mod.discard_checkpoint(ckpt)
        method = build_method(method_name, encoder, seed=cfg.seed, **(method_config or {}))
    else:
        method, run = found
    method.check_scenario(stream.scenario)
    rss = PeakRSS()
    T = len(stream)
    R: list[list[float | None]] = [[None] * T for _ in range(T)]
    R_til: list[list[float | None]] = [[None] * T for _ in range(T)]
    seconds: list[float] = []
    infos: list[dict] = []
    stored: list[float] = []
    samples: dict[str, list] = {}
    steps = [(T - 1, None)] if getattr(method, "joint", False) else [(i, t) for i, t in enumerate(stream)]
    if found is not None:
        R, R_til, seconds, infos = run["accuracy_matrix"], run["til_accuracy_matrix"], run["train_seconds"], run["task_info"]
        stored, samples, rss.peak = run["adapter_bytes_after_task"], run["sample_answers"], max(rss.peak, run["peak_rss_bytes"])
        steps = steps[run["done"]:]
        method.restore_report(run["report"])
        log(f"{method_name} · resuming after task {run['done']} of {T} ({stream.tasks[run['done'] - 1].name}) from {ckpt}")
    method.begin_stream(len(stream))
    for i, task in steps:
        t0 = time.perf_counter()
        if task is None:
            info = method.learn_all(stream.tasks, cfg, stream.scenario, rss=rss, progress=progress)  # type: ignore[attr-defined]  # a joint method
        else:
            info = method.learn(task, cfg, rss=rss, progress=progress)
        seconds.append(time.perf_counter() - t0)
        stored.append((method.adapter_numbers_per_task() * len(method.task_names) + method.shared_numbers()) * BYTES_PER_NUMBER)
        infos.append(info)
        label = "all tasks" if task is None else task.name
        if evaluate == "last" and i < T - 1:
            rss.sample()
            log(f"{method_name} · after {label}: (evaluated after the last task only)   ({seconds[-1]:.0f} s)")
            if checkpoint:
                _checkpoint(ckpt, method, method_name, stream, cfg, i + 1, R, R_til, seconds, infos, stored, samples, rss)
            continue
        til, cil = _rows(method, stream, i, cfg, samples, previous=R_til[i - 1] if i > 0 else None)
        rss.sample()
        R_til[i][: i + 1] = til
        R[i][: i + 1] = cil if cil is not None else til
        log(f"{method_name} · after {label}: " + "  ".join(f"{100 * (a or 0):.1f}" for a in R[i][: i + 1]) + f"   ({seconds[-1]:.0f} s)")
        if checkpoint and i < T - 1:
            _checkpoint(ckpt, method, method_name, stream, cfg, i + 1, R, R_til, seconds, infos, stored, samples, rss)
    results: dict[str, Any] = {
        "method": method_name, "stream": stream.name, "scenario": stream.scenario,
        "tasks": [t.name for t in stream], "accuracy_matrix": R, **summarize(R),
    }
    if stream.modality == "lm":  # scores are each task's metric; FWT as SAPT and GainLoRA report it
        results["metrics"] = {t.name: t.metric for t in stream}
        results["fwt"] = forward_transfer(R) if R[0][0] is not None else None
        results["sample_answers"] = samples
    if stream.scenario == "cil":
        results["til_accuracy_matrix"] = R_til
        results.update({f"til_{k}": v for k, v in summarize(R_til).items()})
    results.update({
        "params_per_task": method.adapter_numbers_per_task(),
        "trainable_params_last_task": method.trainable_numbers_last_task(),
        "bytes_per_task": method.adapter_numbers_per_task() * BYTES_PER_NUMBER,
        "head_bytes_per_task": method.head_numbers_per_task() * BYTES_PER_NUMBER,
        "bytes_shared": method.shared_numbers() * BYTES_PER_NUMBER,
        "adapter_bytes_after_task": stored,  # adapters + shared state (no heads) after each task
        "train_seconds": seconds, "train_seconds_total": sum(seconds), "peak_rss_bytes": rss.peak,
        "config": method.config.to_dict(), "train_config": vars(cfg).copy(), "evaluated": evaluate,
        "device": str(encoder.device), "precision": encoder.precision, "world_size": dist.world_size(),
        "environment": environment(),
        "task_info": [{k: v for k, v in inf.items() if k != "merge"} for inf in infos],  # merges are in report()
        **method.report(),
    })
    results = _json_safe(results)
    if not dist.is_main():
        return results
    d = out_dir / method_name
    d.mkdir(parents=True, exist_ok=True)
    (d / "results.json").write_text(json.dumps(results, indent=2))
    kind = "class-incremental" if stream.scenario == "cil" else "task-incremental"
    what = "score (ROUGE-L / exact match) %" if stream.modality == "lm" else "accuracy %"
    accuracy_heatmap(R, results["tasks"], f"{method_name} on {stream.name}, {kind} {what}", d / "accuracy_matrix.png")
    if method.storable:
        from sharecl.store import save_store

        save_store(method, d / "store", extra={"stream": stream.name})
    if checkpoint:
        resume_mod.discard_checkpoint(ckpt)
    return results


def _checkpoint(path: Path, method, method_name: str, stream: Stream, cfg: TrainConfig, done: int, R, R_til, seconds,
                infos, stored, samples, rss) -> None:
    """Save the run after ``done`` tasks (rank 0; :func:`sharecl.resume.save_checkpoint`)."""
    if dist.is_main():
        state = {"accuracy_matrix": R, "til_accuracy_matrix": R_til, "train_seconds": seconds, "adapter_bytes_after_task": stored,
                 "task_info": [{k: v for k, v in inf.items() if k != "merge"} for inf in infos], "sample_answers": samples,
                 "peak_rss_bytes": rss.peak, "report": method.report()}
        resume_mod.save_checkpoint(path, method, method_name, stream, cfg, done, _json_safe(state))


def load_backbone(stream: Stream, model_path: str | None, cfg: TrainConfig, *, device: str | None = "cpu",
                  precision: str = "fp32"):
    """The backbone a stream's tasks need: a causal LM for generation streams (default: the packaged
    SmolLM2-135M-Instruct), the packaged ViT for image streams, else a text encoder (MiniLM)."""
    if stream.modality == "lm":
        from sharecl.generation.lm import load_causal_lm

        return load_causal_lm(model_path, max_length=stream.max_length or cfg.max_length, device=device, precision=precision)
    if model_path is None and stream.modality == "image":
        from sharecl.vision.convert import default_vit_path

        model_path = str(default_vit_path())
    return load_encoder(model_path, max_length=cfg.max_length, device=device, precision=precision,
                        image_size=stream.image_size or 56)


def run_stream(stream: Stream, methods: list[str], cfg: TrainConfig, out_dir: str | Path, *, model_path: str | None = None,
               method_configs: dict[str, dict] | None = None, progress: bool = True, log=print, device: str | None = "cpu",
               precision: str = "fp32", evaluate: str = "each", resume: bool = False) -> dict[str, dict]:
    """Run every method on ``stream``; writes ``OUT/manifest.json`` and per-method results (rank 0 only).

    ``evaluate``: ``"each"`` (the accuracy matrix) or ``"last"`` (final accuracy only); ``resume``:
    continue a stopped method from its per-task checkpoint; see :func:`run_method`."""
    from sharecl.provenance import library_versions

    out = Path(out_dir)
    precision = dist.resolve_precision(precision, dist.resolve_device(device), stream.modality)  # "auto" → what runs
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        listed, configs = list(methods), dict(method_configs or {})
        try:  # a resumed comparison adds methods to the same seed's directory: keep the earlier ones listed
            before = json.loads((out / "manifest.json").read_text())
            if (before.get("stream"), before.get("seed")) == (stream.name, stream.seed):
                listed = [m for m in before.get("methods", []) if m not in methods] + listed
                configs = {**before.get("method_configs", {}), **configs}
        except (OSError, ValueError):
            pass
        (out / "manifest.json").write_text(json.dumps({
            "stream": stream.name, "seed": stream.seed, "scenario": stream.scenario, "methods": listed,
            "tasks": [t.describe() for t in stream], "stream_max_length": stream.max_length, "train_config": vars(cfg).copy(),
            "method_configs": configs, "model_path": model_path, "device": device, "precision": precision,
            "world_size": dist.world_size(), "library_versions": library_versions(),
            "environment": environment(),
        }, indent=2))
    return {m: run_method(m, stream, cfg, out, model_path=model_path, method_config=(method_configs or {}).get(m),
                          progress=progress, log=log, device=device, precision=precision, evaluate=evaluate,
                          resume=resume) for m in methods}


def _quiet(*args, **kwargs) -> None:
    """The log of ranks other than 0."""

