"""Run methods over a task stream and write what a researcher reads.

For each method: learn the stream's tasks in order, evaluate every task seen so far after
each one (the accuracy matrix), and write ``OUT/<method>/results.json`` and
``OUT/<method>/accuracy_matrix.png``; a method with a store format (Share) also writes
``OUT/<method>/store``.
``OUT/manifest.json`` records the stream (classes, sizes, seed), configs and versions.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from sharecl.backbone import load_encoder
from sharecl.data.tasks import Stream
from sharecl.methods.base import build_method
from sharecl.metrics import summarize
from sharecl.plots import accuracy_heatmap
from sharecl.train import PeakRSS, TrainConfig, evaluate

__all__ = ["run_method", "run_stream"]

BYTES_PER_NUMBER = 4  # float32 storage


def run_method(method_name: str, stream: Stream, cfg: TrainConfig, out_dir: Path, *, model_path: str | None = None,
               method_config: dict | None = None, progress: bool = True, log=print) -> dict:
    """Learn ``stream`` with one method; returns the results dict (also written to JSON)."""
    torch.manual_seed(cfg.seed)
    encoder = load_encoder(model_path, max_length=cfg.max_length)
    method = build_method(method_name, encoder, seed=cfg.seed, **(method_config or {}))
    method.check_scenario(stream.scenario)
    rss = PeakRSS()
    T = len(stream)
    R: list[list[float | None]] = []
    seconds, infos = [], []
    for i, task in enumerate(stream):
        t0 = time.perf_counter()
        info = method.learn(task, cfg, rss=rss, progress=progress)
        seconds.append(time.perf_counter() - t0)
        row = [evaluate(lambda xs, n=t.name: method.logits(xs, n), t, cfg.eval_batch_size) for t in stream.tasks[: i + 1]]
        rss.sample()
        R.append(row + [None] * (T - i - 1))
        infos.append(info)
        log(f"{method_name} · after {task.name}: " + "  ".join(f"{100 * a:.1f}" for a in row) + f"   ({seconds[-1]:.0f} s)")
    results = {
        "method": method_name, "stream": stream.name, "scenario": stream.scenario,
        "tasks": [t.name for t in stream], "accuracy_matrix": R, **summarize(R),
        "params_per_task": method.adapter_numbers_per_task(),
        "trainable_params_last_task": method.trainable_numbers_last_task(),
        "bytes_per_task": method.adapter_numbers_per_task() * BYTES_PER_NUMBER,
        "head_bytes_per_task": method.head_numbers_per_task() * BYTES_PER_NUMBER,
        "bytes_shared": method.shared_numbers() * BYTES_PER_NUMBER,
        "train_seconds": seconds, "train_seconds_total": sum(seconds), "peak_rss_bytes": rss.peak,
        "config": method.config.to_dict(), "train_config": vars(cfg).copy(),
        "task_info": [{k: v for k, v in inf.items() if k != "merge"} for inf in infos],  # merges are in report()
        **method.report(),
    }
    d = out_dir / method_name
    d.mkdir(parents=True, exist_ok=True)
    (d / "results.json").write_text(json.dumps(results, indent=2))
    accuracy_heatmap(R, results["tasks"], f"{method_name} on {stream.name} (accuracy %)", d / "accuracy_matrix.png")
    if method.storable:
        from sharecl.store import save_store

        save_store(method, d / "store", extra={"stream": stream.name})
    return results


def run_stream(stream: Stream, methods: list[str], cfg: TrainConfig, out_dir: str | Path, *, model_path: str | None = None,
               method_configs: dict[str, dict] | None = None, progress: bool = True, log=print) -> dict[str, dict]:
    """Run every method on ``stream``; writes ``OUT/manifest.json`` and per-method results."""
    from sharecl.store import library_versions

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_text(json.dumps({
        "stream": stream.name, "seed": stream.seed, "scenario": stream.scenario, "methods": methods,
        "tasks": [t.describe() for t in stream], "train_config": vars(cfg).copy(),
        "method_configs": method_configs or {}, "model_path": model_path, "library_versions": library_versions(),
    }, indent=2))
    return {m: run_method(m, stream, cfg, out, model_path=model_path, method_config=(method_configs or {}).get(m),
                          progress=progress, log=log) for m in methods}
