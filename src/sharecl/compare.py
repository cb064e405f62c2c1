"""``sharecl compare``: every method on one stream, same budget, several seeds, one table.

Runs each (seed, method) with :func:`sharecl.runner.run_method` into
``OUT/seed-<s>/<method>/results.json`` (skipped when present and ``resume`` is set, so an
interrupted comparison continues where it stopped; a storable method also continues after the
last task it finished, :mod:`sharecl.resume`), then writes ``OUT/compare.json`` and
``OUT/compare.md`` (mean ± sample std over seeds) and two plots: ``accuracy_curve.png``
(average accuracy over the tasks seen so far, after each task, one line per method) and
``bytes.png`` (adapter bytes stored against the number of tasks).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, replace
from pathlib import Path

from sharecl import distributed as dist
from sharecl.data.streams import get_stream
from sharecl.methods.registry import METHODS
from sharecl.train import TrainConfig

__all__ = ["METRICS", "all_methods", "compare", "aggregate", "write_report"]

def all_methods(modality: str) -> list[str]:
    """What ``--methods all`` runs on a stream of ``modality``'s tasks: every registered method with
    an :attr:`~sharecl.methods.base.ContinualMethod.all_order` that learns them (``lm``: generation,
    where the zero-shot model is the floor; else classification, where head-only is)."""
    from sharecl.methods.registry import all_methods as registered

    return registered("generation" if modality == "lm" else "classification")

#: (results.json key, column title, scale) of the comparison table; accuracies in %.
METRICS = [
    ("final_average_accuracy", "final acc %", 100), ("average_incremental_accuracy", "avg incr acc %", 100),
    ("forgetting", "forgetting", 100), ("bwt", "BWT", 100), ("til_final_average_accuracy", "TIL final acc %", 100),
    ("trainable_params_last_task", "trainable / task", 1), ("bytes_per_task", "bytes / task", 1),
    ("bytes_shared", "bytes shared", 1), ("head_bytes_per_task", "head bytes / task", 1), ("train_seconds_total", "train s", 1),
    ("fwt", "FWT %", 100),
]


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def aggregate(per_seed: dict[str, list[dict]]) -> dict[str, dict]:
    """``{method: [results per seed]}`` → ``{method: {metric: {"mean", "std"}, "seeds", "curve"}}``.

    ``curve[i]`` is the mean over seeds of the average accuracy over tasks ``0..i`` after task i.
    """
    out = {}
    for m, runs in per_seed.items():
        if not runs:
            continue
        entry = {"seeds": [r["train_config"]["seed"] for r in runs], "scenario": runs[0]["scenario"]}
        for key, _, _ in METRICS:
            mean, std = _mean_std([r.get(key) for r in runs])
            entry[key] = {"mean": mean, "std": std}
        T = len(runs[0]["tasks"])
        curve = []
        for i in range(T):
            vals = [statistics.fmean(r["accuracy_matrix"][i][: i + 1]) for r in runs if r["accuracy_matrix"][i][0] is not None]
            curve.append(statistics.fmean(vals) if vals else None)
        entry["curve"] = curve
        stored = runs[0].get("adapter_bytes_after_task")
        if stored is None and "bytes_per_task" in runs[0]:  # results older than this key: per-task × tasks + shared
            stored = [runs[0]["bytes_shared"] + runs[0]["bytes_per_task"] * (i + 1) for i in range(T)]
            entry["adapter_bytes_derived"] = True
        entry["adapter_bytes_after_task"] = stored
        out[m] = entry
    return out


def _cell(v: dict, scale: float) -> str:
    if v["mean"] is None:
        return "—"
    if scale == 100:
        return f"{100 * v['mean']:.2f} ± {100 * v['std']:.2f}"
    return f"{v['mean']:,.0f}" if v["std"] == 0 or v["std"] is None else f"{v['mean']:,.0f} ± {v['std']:,.0f}"


def write_report(summary: dict, out: Path, stream: str, scenario: str, skipped: dict[str, str], tuned: dict | None = None,
                 method_lrs: dict[str, float] | None = None) -> str:
    """Write ``compare.md``, ``compare.json`` and the two plots; returns the markdown."""
    kind = "class-incremental (no task id)" if scenario == "cil" else "task-incremental"
    generation = any(e.get("fwt", {}).get("mean") is not None for e in summary.values())
    cols = [(k, t, s) for k, t, s in METRICS if (k != "til_final_average_accuracy" or scenario == "cil")
            and (k != "fwt" or generation)]
    if generation:  # scores are each task's metric (ROUGE-L or exact match)
        cols = [(k, t.replace("acc", "score"), s) for k, t, s in cols]
    what = ("Scores in % (each task's metric: ROUGE-L F1 or exact match; FWT = mean score of each task right after it "
            "is learned); zero-shot is the base model untouched") if generation else "Accuracies in %"
    lines = [f"# sharecl compare: `{stream}`, {kind}", "",
             "Mean ± sample std over seeds " + ", ".join(str(s) for s in next(iter(summary.values()))["seeds"]) + ". "
             f"{what}; bytes are float32 adapter state (heads separate); joint-lora is the non-continual "
             "ceiling and has only a final score.", "",
             "| method | " + " | ".join(t for _, t, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m, e in summary.items():
        lines.append(f"| {m} | " + " | ".join(_cell(e[k], s) for k, _, s in cols) + " |")
    for m, why in skipped.items():
        lines.append(f"\n- `{m}` not run: {why}")
    if tuned:
        def choice(m: str, t: dict) -> str:
            opt = "" if t["optimizer"] == "adamw" else " " + t["optimizer"]
            grid = ", ".join(f"{lr}: {100 * v:.1f}" for lr, v in t["validation_final_accuracy"].items())
            return f"{m} **{t['lr']:g}{opt}**{' (grid edge)' if t.get('at_grid_edge') else ''} ({grid})"
        lines.append(f"\nLearning rates chosen on the validation split of seed {next(iter(tuned.values()))['seed']} "
                     "(final accuracy there, %): " + "; ".join(choice(m, t) for m, t in tuned.items()))
        if any(t.get("at_grid_edge") for t in tuned.values()):
            lines.append("\n(grid edge): the best rate of its optimiser's grid is its smallest or largest; a wider grid "
                         "may find a better one.")
    if method_lrs:
        lines.append("\nLearning rates set per method (`--method-lr`, not tuned on this stream): "
                     + "; ".join(f"{m} **{lr:g}**" for m, lr in method_lrs.items()))
    md = "\n".join(lines) + "\n"
    (out / "compare.md").write_text(md)
    (out / "compare.json").write_text(json.dumps({"stream": stream, "scenario": scenario, "methods": summary,
                                                  "skipped": skipped, **({"tuned_lr": tuned} if tuned else {}),
                                                  **({"method_lr": method_lrs} if method_lrs else {})}, indent=2))
    _plots(summary, out, stream, kind)
    return md


def _plots(summary: dict, out: Path, stream: str, kind: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = max(len(e["curve"]) for e in summary.values())

    def finish(fig, ax, ylabel: str, title: str, name: str) -> None:
        ax.set_xticks(range(1, T + 1))
        ax.set_xlabel("tasks learned")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, e in summary.items():
        xs = [i + 1 for i, v in enumerate(e["curve"]) if v is not None]
        ys = [100 * v for v in e["curve"] if v is not None]
        ax.plot(xs, ys, marker="o" if len(xs) > 1 else "*", markersize=6 if len(xs) > 1 else 12, label=m)
    finish(fig, ax, "average accuracy on seen tasks (%)", f"{stream}: {kind}", "accuracy_curve.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, e in summary.items():
        b = e.get("adapter_bytes_after_task") or []
        if len(b) > 1:
            ax.plot(range(1, len(b) + 1), b, marker="o", label=m)
        elif b:
            ax.plot([len(e["curve"])], b, marker="*", markersize=12, linestyle="", label=m)
    ax.set_yscale("symlog", linthresh=1e3)
    finish(fig, ax, "adapter bytes stored (float32, no heads)", f"{stream}: storage", "bytes.png")


def _same(a, b) -> bool:
    """Equal settings; floats equal to 1e-9 relative (a rate computed as 10 × 3e-4 is 3e-3)."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def _check_same_settings(path: Path, old: dict, cfg: TrainConfig, method: str, method_config: dict) -> None:
    """Refuse to reuse a ``results.json`` made with another training budget or method option
    (given now, or a default that has changed since). Share's ``cil_score`` only matters for a
    class-incremental stream, where ``--align`` makes it ``"aligned"``."""
    defaults = asdict(TrainConfig())
    done = old.get("train_config", {})
    diff = [f"{k}={done.get(k, defaults[k])!r} (now {v!r})" for k, v in asdict(cfg).items() if not _same(done.get(k, defaults[k]), v)]
    oc = old.get("config", {})
    want = METHODS[method].default_config(**method_config)
    if old.get("scenario") != "cil":
        want.pop("cil_score", None)
    elif cfg.align and "cil_score" in want:
        want["cil_score"] = "aligned"  # --align sets Share's score (ShareClassIncremental.align_classifier)
    diff += [f"{method}.{k}={oc[k]!r} (now {v!r})" for k, v in want.items() if v is not None and k in oc and oc[k] != v]
    if diff:
        raise ValueError(f"{path} was made with other settings: {', '.join(diff)}; pass another --out, or --no-resume "
                         f"to recompute it")


def compare(stream: str, methods: list[str], seeds: list[int], cfg: TrainConfig, out_dir: str | Path, *,
            model_path: str | None = None, method_configs: dict[str, dict] | None = None, stream_options: dict | None = None,
            resume: bool = True, progress: bool = True, log=print, device: str | None = "cpu",
            precision: str = "fp32", tune_lrs: list[float] | None = None,
            tune_sgd_lrs: list[float] | None = None, method_lrs: dict[str, float] | None = None) -> tuple[dict, str]:
    """Run ``methods`` on ``stream`` for every seed; returns ``(summary, markdown)``.

    With ``tune_lrs`` every trained method first runs each learning rate of the grid (adapters
    and head alike) on the **validation** split of the first seed's stream
    (:func:`~sharecl.data.tasks.validation_stream`; runs under ``OUT/tune/lr-<lr>/``), keeps the
    one with the best final average accuracy (class-incremental on a CIL stream; ties → the
    earlier in the grid), and runs every seed with it; a method whose official code trains with
    another optimiser (SD-LoRA: SGD with momentum 0.9) also runs ``tune_sgd_lrs`` with it (default:
    the grid × 10, since SGD's useful rates sit about an order of magnitude above AdamW's) and keeps
    the best pair; the grid's scores and the choice are in ``compare.json`` under ``tuned_lr``.
    Otherwise every method runs at ``cfg.lr``, or at its rate in ``method_lrs`` (rates chosen
    elsewhere, e.g. on another stream's validation split: ``compare.json`` records them under
    ``method_lr``, the report names them).

    Methods that do not support the stream's scenario are skipped with the reason recorded.
    Under ``torchrun`` rank 0 decides what to resume and writes the report; the other ranks
    return an empty markdown.

    Raises:
        KeyError: for an unknown stream or method name.
        ValueError: for an empty method or seed list.
    """
    from sharecl.runner import run_stream

    if not methods or not seeds:
        raise ValueError("give at least one method and one seed")
    method_lrs = dict(method_lrs or {})
    if method_lrs and tune_lrs:
        raise ValueError("per-method rates and --tune-lr both choose the learning rate; give one of them")
    stray = sorted(set(method_lrs) - set(methods))
    if stray:
        raise ValueError(f"a learning rate is given for {stray}, which are not among the methods run ({', '.join(methods)})")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise KeyError(f"unknown method(s) {unknown}; known: {sorted(METHODS)}")
    out = Path(out_dir)
    per_seed: dict[str, list[dict]] = {m: [] for m in methods}
    skipped: dict[str, str] = {}
    scenario = "til"
    tuned = {}
    if tune_lrs:
        tuned = tune_learning_rates(stream, methods, seeds[0], cfg, tune_lrs, out / "tune", sgd_grid=tune_sgd_lrs,
                                    model_path=model_path,
                                    method_configs=method_configs, stream_options=stream_options, resume=resume,
                                    progress=progress, log=log, device=device, precision=precision)
    cfgs = {m: replace(cfg, lr=tuned[m]["lr"], head_lr=tuned[m]["lr"], optimizer=tuned[m]["optimizer"]) if m in tuned
            else replace(cfg, lr=method_lrs[m], head_lr=method_lrs[m]) if m in method_lrs else cfg for m in methods}
    for seed in seeds:
        s = get_stream(stream, seed=seed, **(stream_options or {}))
        scenario = s.scenario
        todo = []
        kind = "generation" if s.modality == "lm" else "classification"
        for m in methods:
            if kind not in METHODS[m].task_kinds:
                skipped[m] = f"learns {' and '.join(METHODS[m].task_kinds)} tasks, the stream holds {kind} tasks"
                continue
            if s.scenario not in METHODS[m].scenarios:
                skipped[m] = f"supports {list(METHODS[m].scenarios)}, the stream is {s.scenario}"
                continue
            if cfg.align and not METHODS[m].aligns:
                skipped[m] = "--align needs one feature space for all tasks; this method scores each task under its own"
                continue
            f = out / f"seed-{seed}" / m / "results.json"
            if resume and f.exists():
                old = json.loads(f.read_text())
                _check_same_settings(f, old, replace(cfgs[m], seed=seed), m, (method_configs or {}).get(m, {}))
                per_seed[m].append(old)
                log(f"seed {seed} · {m}: reusing {f}")
            else:
                todo.append(m)
        todo = dist.broadcast_object(todo)
        for group in _same_config_groups(todo, cfgs):
            res = run_stream(s, group, replace(cfgs[group[0]], seed=seed), out / f"seed-{seed}", model_path=model_path,
                             method_configs=method_configs, progress=progress, log=log, device=device, precision=precision,
                             resume=resume)
            for m in group:
                per_seed[m].append(res[m])
    summary = aggregate({m: r for m, r in per_seed.items() if r})
    if not dist.is_main():
        return summary, ""
    return summary, write_report(summary, out, stream, scenario, skipped, tuned, method_lrs)


def _same_config_groups(methods: list[str], cfgs: dict[str, TrainConfig]) -> list[list[str]]:
    """``methods`` in order, grouped by identical training configs (one run_stream call each)."""
    groups: list[list[str]] = []
    for m in methods:
        for g in groups:
            if cfgs[g[0]] == cfgs[m]:
                g.append(m)
                break
        else:
            groups.append([m])
    return groups


def at_grid_edge(lr: float, grid: list[float]) -> bool:
    """Whether ``lr`` is the smallest or largest of a grid of two or more rates: a choice there says
    the best rate may lie outside the grid (``compare.md`` marks it)."""
    return len(set(grid)) > 1 and lr in (min(grid), max(grid))


def tune_learning_rates(stream: str, methods: list[str], seed: int, cfg: TrainConfig, grid: list[float], out: Path, *,
                        sgd_grid: list[float] | None = None, model_path=None, method_configs=None, stream_options=None,
                        resume=True, progress=True, log=print, device="cpu", precision="fp32") -> dict[str, dict]:
    """Each method's best learning rate of ``grid`` on the validation split of ``seed``'s stream.

    A method with an official optimiser other than ``cfg.optimizer`` (SD-LoRA: SGD) also runs
    ``sgd_grid`` with that optimiser (default ``[10 * lr for lr in grid]``) and keeps the best pair.
    Each trial evaluates after the last task only (``run_stream(evaluate="last")``): the final
    accuracy is all the choice reads, and on a T-task stream the matrix costs T(T+1)/2 evaluations.

    Returns:
        ``{method: {"lr": chosen, "optimizer": its optimiser, "validation_final_accuracy": {lr: score},
        "seed": seed, "at_grid_edge": bool}}`` for every method the stream supports (not those a
        learning rate does not affect); ``at_grid_edge`` (:func:`at_grid_edge`) is judged within the
        chosen optimiser's grid.

    Raises:
        ValueError: for an empty grid, a non-positive rate, or a stream without validation splits.
    """
    from sharecl.data.tasks import validation_stream
    from sharecl.runner import run_stream

    if not grid or any(lr <= 0 for lr in grid):
        raise ValueError(f"--tune-lr needs positive learning rates, got {grid}")
    if sgd_grid is not None and (not sgd_grid or any(lr <= 0 for lr in sgd_grid)):
        raise ValueError(f"--tune-sgd-lr needs positive learning rates, got {sgd_grid}")
    official_grid = sgd_grid if sgd_grid is not None else [float(f"{10 * lr:.12g}") for lr in grid]
    s = validation_stream(get_stream(stream, seed=seed, **(stream_options or {})))
    kind = "generation" if s.modality == "lm" else "classification"
    chosen = {}
    for m in methods:
        M = METHODS[m]
        if not M.trains or kind not in M.task_kinds or s.scenario not in M.scenarios or (cfg.align and not M.aligns):
            continue
        scores = {}
        trials = [(lr, cfg.optimizer) for lr in grid]
        if M.official_optimizer and M.official_optimizer != cfg.optimizer:
            trials += [(lr, M.official_optimizer) for lr in official_grid]
        for lr, optimizer in trials:
            c = replace(cfg, seed=seed, lr=lr, head_lr=lr, optimizer=optimizer)
            d = out / (f"lr-{lr:g}" if optimizer == "adamw" else f"lr-{lr:g}-{optimizer}")
            f = d / m / "results.json"
            if resume and f.exists():
                res = json.loads(f.read_text())
                _check_same_settings(f, res, c, m, (method_configs or {}).get(m, {}))
            else:
                res = run_stream(s, [m], c, d, model_path=model_path, method_configs=method_configs, progress=progress,
                                 log=log, device=device, precision=precision, evaluate="last", resume=resume)[m]
            scores[(lr, optimizer)] = res["final_average_accuracy"]
            log(f"tuning {m}: {optimizer} lr {lr:g} → validation final accuracy {100 * res['final_average_accuracy']:.2f}")
        best = max(trials, key=lambda t: (scores[t], -trials.index(t)))
        chosen[m] = {"lr": best[0], "optimizer": best[1], "seed": seed,
                     "at_grid_edge": at_grid_edge(best[0], [lr for lr, o in trials if o == best[1]]),
                     "validation_final_accuracy": {(f"{lr:g}" if o == "adamw" else f"{lr:g} {o}"): v for (lr, o), v in scores.items()}}
    return chosen
