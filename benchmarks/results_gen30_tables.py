"""The gen30 tables (the long generation stream on the packaged SmolLM2) of the docs site: the
comparison, each task's scores, and Share's merges along the stream (kept energy, drift).

Registered in :data:`results_tables.TABLES` on import (``results_pages.py`` imports this module).
"""

from __future__ import annotations

import statistics

from results_tables import all_rows, compare_json, compare_table, label, md, run, table

FOLDER = "compare-gen30"
MERGE_ROWS = 9  # merges shown in the merge table (evenly spaced, the last included)


def _seed() -> int:
    c = compare_json(FOLDER)
    return c["methods"][next(iter(c["methods"]))]["seeds"][0]


def _rates() -> str:
    c = compare_json(FOLDER)
    rates = c.get("method_lr") or {m: t["lr"] for m, t in c.get("tuned_lr", {}).items()}
    how = "set per method (chosen on gen5's validation split, not tuned on gen30)" if c.get("method_lr") else "chosen on gen30's validation split"
    return f"Learning rates {how}: " + ", ".join(f"{m} {lr:g}" for m, lr in rates.items()) + "." if rates else ""


def _present() -> list[str]:
    return list(compare_json(FOLDER)["methods"])


@table("gen30")
def _gen30() -> str:
    """Every method run on gen30 (one seed): final score, forgetting, BWT and bytes."""
    rows = all_rows(FOLDER)
    return compare_table(rows, lora_ref=(FOLDER, "lora-per-task"), seed=_seed()) + " " + _rates() + _learnable()


def _learnable() -> str:
    """Each method's final mean over only the tasks its own LoRA learns (LoRA per task above
    zero-shot after the last task): tasks no method learns pull every final score toward zero-shot
    and shrink the gaps between methods."""
    present = _present()
    if not {"zero-shot", "lora-per-task"} <= set(present):
        return ""
    seed = _seed()
    last = {m: run(FOLDER, seed, m)["accuracy_matrix"][-1] for m in present}
    names = run(FOLDER, seed, "lora-per-task")["tasks"]
    keep = [i for i, (lo, z) in enumerate(zip(last["lora-per-task"], last["zero-shot"])) if lo > z]
    dropped = [names[i] for i in range(len(names)) if i not in keep]
    means = ", ".join(f"{label(m)} {100 * statistics.mean(last[m][i] for i in keep):.2f}" for m in present)
    return (f"\n\nOn the {len(keep)} tasks a LoRA per task learns (scores above zero-shot after the last task; without "
            f"{', '.join(dropped)}), final mean %: {means}.")


@table("gen30-per-task")
def _gen30_per_task() -> str:
    """Each task: its metric, zero-shot's and LoRA per task's scores, Share's right after learning it and
    after the last task, and the largest drift of its ΔW in one merge (the methods that ran)."""
    seed, present = _seed(), _present()
    runs = {m: run(FOLDER, seed, m) for m in present}
    first = runs[present[0]]
    header, cols = ["#", "task", "metric"], []
    for m, what in (("zero-shot", "zero-shot %"), ("lora-per-task", "LoRA per task %")):
        if m in runs:
            header.append(what)
            cols.append(lambda i, R=runs[m]["accuracy_matrix"]: f"{100 * R[-1][i]:.1f}")
    if "share" in runs:
        R = runs["share"]["accuracy_matrix"]
        worst: dict[str, float] = {}
        for rec in runs["share"].get("merges", []):
            for name, d in rec.get("per_task", {}).items():
                worst[name] = max(worst.get(name, 0.0), d["mean"])
        names = runs["share"]["tasks"]
        header += ["Share after learning it %", "Share after the last task %", "change", "Share: largest drift of its ΔW in one merge %"]
        cols += [lambda i: f"{100 * R[i][i]:.1f}", lambda i: f"{100 * R[-1][i]:.1f}",
                 lambda i: f"{100 * (R[-1][i] - R[i][i]):+.1f}".replace("-", "−"), lambda i: f"{100 * worst.get(names[i], 0.0):.1f}"]
    body = [[i + 1, name, first["metrics"][name], *(c(i) for c in cols)] for i, name in enumerate(first["tasks"])]
    return md(header, body) + (
        "\n\nDrift: the relative Frobenius change of the task's ΔW in one merge, mean over the adapted layers "
        f"(the merges' records in `results.json`). Seed {seed}.")


def _targets(config: dict) -> str:
    """The adapted layers of a run's config, in words."""
    t = config.get("target_modules")
    return "all linear layers" if t == "all-linear" else "/".join(t) if isinstance(t, list) else str(t)


@table("gen30-share-merges")
def _gen30_merges() -> str:
    """Share's merges along the stream: basis size, the least energy kept, old tasks' drift and scores."""
    seed = _seed()
    if "share" not in _present():
        return "Share has no finished run on gen30 yet (`benchmarks/results/compare-gen30/` holds the methods that finished)."
    share = run(FOLDER, seed, "share")
    merges, R = share.get("merges", []), share["accuracy_matrix"]
    T = len(merges)
    picks = sorted({round(j * (T - 1) / (MERGE_ROWS - 1)) for j in range(MERGE_ROWS)}) if T > MERGE_ROWS else list(range(T))
    body = []
    for j in picks:
        rec = merges[j]
        drifts = [d["mean"] for d in rec.get("per_task", {}).values()]
        seen = [x for x in R[j][: j + 1] if x is not None]
        body.append([j + 1, rec["after_task"], "/".join(str(k) for k in rec["k"][0]), f"{100 * rec['kept_energy_min']:.1f}",
                     f"{100 * statistics.mean(drifts):.1f}" if drifts else "—", f"{100 * max(drifts):.1f}" if drifts else "—",
                     f"{100 * rec['new_task']['truncation_mean']:.1f}", f"{100 * statistics.mean(seen):.1f}" if seen else "—"])
    return md(["merge", "after task", "k (B/A, first layer)", "least energy kept %", "old tasks' drift, mean %", "max %",
               "new task's cut to p %", "mean score of the tasks so far %"], body) + (
        f"\n\nShare k {share['config']['k']}, p {share['config']['p']}, φ {share['config']['phi']} on "
        f"{_targets(share['config'])}: after task t the basis of each layer and side keeps the top k of "
        f"the t tasks' rank-p factors; energy kept = the fraction of the stack's squared norm the k directions hold (least over "
        f"layers and sides). Seed {seed}.")
