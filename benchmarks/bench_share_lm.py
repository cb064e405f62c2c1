"""Share on a causal LM: where its gap to a LoRA per task comes from (issue 30), on gen5's
**validation** split, one factor at a time from a starting setting and then in combinations.

Every trial learns the five gen5 tasks (seed 0) with one method on the packaged
SmolLM2-135M-Instruct and evaluates every task after the last one on its validation split
(``run_stream(evaluate="last")``, as ``compare --tune-lr`` does): the final validation score,
each task's score, adapter bytes per task, trainable numbers and training seconds.

    python benchmarks/bench_share_lm.py --list
    python benchmarks/bench_share_lm.py --only base,p4 --threads 1      # run (resumes: a finished trial is read back)
    python benchmarks/bench_share_lm.py --table                        # print and write the table from what has run
    python benchmarks/bench_share_lm.py --queue queue.txt              # run trials named in a file, one per line, as
                                                                       # they are added; several processes share it; a line
                                                                       # "name {"options": {...}, "train": {...}}" defines one;
                                                                       # a trial stopped with its process resumes after its
                                                                       # last finished task

Runs live under ``runs/share-lm-ablation/<trial>/`` (``--runs``); the table and every trial's row
go to ``results/share_lm_ablation.json``. Trials are independent: split them over processes with
``--only`` (one thread each).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from _common import write

STEPS, BATCH, LR = 60, 8, 1e-3  # gen5's budget as the committed compare ran it
#: the starting setting: Share's encoder defaults as gen5 ran them before issue 30
BASE = {"k": 10, "p": 2, "phi": 2, "init": "zero", "r": 8, "coeff_lr_ratio": 1.0, "phi_lr_ratio": 1.0}

#: trial name → (method, method options on top of BASE for Share, training options)
TRIALS: dict[str, tuple[str, dict, dict]] = {
    "lora-per-task": ("lora-per-task", {"r": 8}, {}),
    "base": ("share", {}, {}),
    "p4": ("share", {"p": 4}, {}),
    "p8": ("share", {"p": 8}, {}),
    "k16": ("share", {"k": 16}, {}),
    "k32": ("share", {"k": 32}, {}),
    "phi4": ("share", {"phi": 4}, {}),
    "phi8": ("share", {"phi": 8}, {}),
    "init-previous": ("share", {"init": "previous"}, {}),
    "merge-ft20": ("share", {"merge_finetune_steps": 20}, {}),
    "lr3e-3": ("share", {}, {"lr": 3e-3}),
    "lr1e-2": ("share", {}, {"lr": 1e-2}),
    "qkvo": ("share", {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}, {}),
    "steps120": ("share", {}, {"steps": 120}),
    "all-linear": ("share", {"target_modules": "all-linear"}, {}),
    "phi-top": ("share", {"phi_init": "top"}, {}),
    "phi-uniform": ("share", {"phi_init": "uniform"}, {}),
    "ratio3": ("share", {"coeff_lr_ratio": 3.0}, {}),
    "ratio10": ("share", {"coeff_lr_ratio": 10.0}, {}),
    "ratio30": ("share", {"coeff_lr_ratio": 30.0}, {}),
}


def claim(runs: Path, name: str) -> bool:
    """Atomically claim a trial for this process (a ``.claimed`` directory holding a file named by
    its pid); False when a live process has it. A claim whose process is gone (a stopped session)
    is taken over: the trial resumes from its per-task checkpoint."""
    d = runs / name / ".claimed"
    (runs / name).mkdir(parents=True, exist_ok=True)
    try:
        d.mkdir()
    except FileExistsError:
        owners = [int(f.name) for f in d.iterdir() if f.name.isdigit()]
        if any(_alive(pid) for pid in owners):
            return False
        for f in d.iterdir():
            f.unlink()
    (d / str(os.getpid())).touch()
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_queue(queue: Path, runs: Path, threads: int, precision: str) -> None:
    """Run every trial named in ``queue`` (one name per line, ``#`` comments) that no process has
    claimed, re-reading the file after each trial so that trials can be appended while it runs."""
    while True:
        names = []
        for ln in queue.read_text().splitlines():
            name, _, spec = ln.split("#")[0].strip().partition(" ")
            if spec.strip():  # "name {json}" defines a trial: {"method", "options", "train"}
                d = json.loads(spec)
                TRIALS[name] = (d.get("method", "share"), d.get("options", {}), d.get("train", {}))
            names.append(name)
        todo = [n for n in names if n and not (runs / n / TRIALS.get(n, ("?",))[0] / "results.json").exists()]
        unknown = [n for n in todo if n not in TRIALS]
        if unknown:
            raise SystemExit(f"unknown trial(s) {unknown} in {queue}; --list shows them")
        if not todo:
            return
        mine = next((n for n in todo if claim(runs, n)), None)
        if mine is None:  # every trial left is another live process's
            return
        run_trial(mine, runs, threads, precision)


def run_trial(name: str, runs: Path, threads: int, precision: str) -> dict:
    """Run (or read back) one trial; returns its row."""
    import torch

    from sharecl.data.streams import get_stream
    from sharecl.data.tasks import validation_stream
    from sharecl.runner import run_stream
    from sharecl.train import TrainConfig

    method, options, train = TRIALS[name]
    out = runs / name
    f = out / method / "results.json"
    if not f.exists():
        torch.set_num_threads(threads)
        cfg = TrainConfig(steps=train.get("steps", STEPS), batch_size=BATCH, lr=train.get("lr", LR), head_lr=train.get("lr", LR),
                          seed=0)
        config = {**BASE, **options} if method == "share" else options
        stream = validation_stream(get_stream("gen5", seed=0))
        t0 = time.perf_counter()
        run_stream(stream, [method], cfg, out, method_configs={method: config}, progress=False, precision=precision,
                   evaluate="last", resume=True, log=lambda *a, **k: print(f"[{name}]", *a, flush=True))
        print(f"[{name}] done in {time.perf_counter() - t0:.0f} s", flush=True)
    return row(name, json.loads(f.read_text()))


def row(name: str, res: dict) -> dict:
    last = res["accuracy_matrix"][-1]
    return {"trial": name, "method": res["method"], "validation_score": res["final_average_accuracy"],
            "per_task": dict(zip(res["tasks"], last)), "bytes_per_task": res["bytes_per_task"],
            "trainable_last_task": res["trainable_params_last_task"], "train_seconds": res["train_seconds_total"],
            "config": res["config"], "train_config": res["train_config"], "precision": res["precision"],
            "environment": res["environment"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated trials (default: every trial)")
    ap.add_argument("--queue", type=Path, help="a file naming trials, one per line, read again after each trial")
    ap.add_argument("--list", action="store_true", help="list the trials and exit")
    ap.add_argument("--table", action="store_true", help="only print and write the table of finished trials")
    ap.add_argument("--runs", type=Path, default=Path("runs/share-lm-ablation"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", default="bf16")
    a = ap.parse_args()
    if a.list:
        for n, (m, o, t) in TRIALS.items():
            print(f"{n:16s} {m:14s} {o} {t}")
        return
    names = [n.strip() for n in a.only.split(",")] if a.only else list(TRIALS)
    unknown = [n for n in names if n not in TRIALS]
    if unknown:
        raise SystemExit(f"unknown trial(s) {unknown}; --list shows them")
    if a.queue and not a.table:
        run_queue(a.queue, a.runs, a.threads, a.precision)
    elif not a.table:
        for n in names:
            run_trial(n, a.runs, a.threads, a.precision)
    done = {d.parent.parent.name: d for d in sorted(a.runs.glob("*/*/results.json"))}  # trial → its results
    order = [n for n in TRIALS if n in done] + sorted(n for n in done if n not in TRIALS)
    rows = [row(n, json.loads(done[n].read_text())) for n in order]
    ref = next((r["bytes_per_task"] for r in rows if r["method"] == "lora-per-task"), None)
    tasks = list(rows[0]["per_task"]) if rows else []
    print("| trial | validation score % | " + " | ".join(tasks) + " | bytes / task | % of LoRA | train s |")
    print("|---|---|" + "---|" * len(tasks) + "---|---|---|")
    for r in rows:
        share = f"{100 * r['bytes_per_task'] / ref:.1f}" if ref else "—"
        print(f"| {r['trial']} | {100 * r['validation_score']:.2f} | " + " | ".join(f"{100 * v:.1f}" for v in r["per_task"].values())
              + f" | {r['bytes_per_task']:,.0f} | {share} | {r['train_seconds']:.0f} |")
    if rows:
        print("written:", write("share_lm_ablation", {"stream": "gen5 (seed 0, validation split)", "base": BASE,
                                                       "budget": {"steps": STEPS, "batch_size": BATCH, "lr": LR},
                                                       "rows": rows}))


if __name__ == "__main__":
    main()
