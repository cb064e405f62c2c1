"""The README's summary table: per stream, Share's best run against the best peer and the
reference (LoRA per task, or joint LoRA on class-incremental streams), from every comparison
folder that competes on that stream.

Registered in :data:`results_tables.TABLES` on import (``results_pages.py`` imports this module).
"""

from __future__ import annotations

import functools

from results_tables import RESULTS, compare_json, label, md, mean, num, one, pct_of, pm, table

# ------------------------------------------------------------------------ README summary
PEERS = ("inflora", "sd-lora", "dual-lora")

#: stream → (the folders whose runs compete, what the reference column is)
SUMMARY = {
    "text5": (["compare-text5-tuned", "compare-text5-share-current", "compare-text5"], "lora-per-task"),
    "fmnist-then-mnist": (["compare-fmnist-then-mnist-tuned", "compare-fmnist-then-mnist"], "lora-per-task"),
    "text20 (seed 0)": (["compare-text20"], "lora-per-task"),
    "images20 (seed 0)": (["compare-images20"], "lora-per-task"),
    # the tuned comparison replaces the untuned one: its splits differ (200 test pairs per task, not 40)
    "gen5 (causal LM)": (["compare-gen5-tuned|compare-gen5", "compare-gen5-all-linear", "compare-gen5-tuned-peers"], "lora-per-task"),
    "gen30 (causal LM, 36 tasks, seed 0)": (["compare-gen30"], "lora-per-task"),
    "wordnet-cil": (["compare-wordnet-cil-tuned", "compare-wordnet-cil-share-prototype", "compare-wordnet-cil", "compare-wordnet-cil-align"],
                    "joint-lora"),
    "fmnist-cil": (["compare-fmnist-cil-tuned", "compare-fmnist-cil", "compare-fmnist-cil-align", "compare-fmnist-cil-share-align"],
                   "joint-lora"),
    "mnist-cil": (["compare-mnist-cil-tuned", "compare-mnist-cil", "compare-mnist-cil-align", "compare-mnist-cil-share-align"], "joint-lora"),
}


def _variant(folder: str) -> str:
    if compare_json(folder).get("method_lr"):  # rates chosen on another run's validation trials
        return "rates from gen5's tuning" if "gen30" in folder else "tuned" if "tuned" in folder else "rates set per method"
    if "all-linear" in folder:
        return "all linear layers"
    return "aligned" if "align" in folder else "tuned" if "tuned" in folder else "untuned"


def _present(folders: list[str]) -> list[str]:
    """The folders with a report; ``"A|B"`` is A when it has one, else B (a comparison replacing another)."""
    out = []
    for f in folders:
        alternatives = [a for a in f.split("|") if (RESULTS / a / "compare.json").exists()]
        out += alternatives[:1]
    return out


def _best(folders: list[str], methods: tuple[str, ...]) -> tuple[str, str, dict] | None:
    """``(method, folder, entry)`` with the highest mean final score among ``methods`` in ``folders``."""
    folders = _present(folders)
    found = [(m, f, e) for f in folders for m, e in compare_json(f)["methods"].items()
             if m in methods and mean(e["final_average_accuracy"])]
    return max(found, key=lambda t: mean(t[2]["final_average_accuracy"])) if found else None


def _cell(t: tuple[str, str, dict], seeds: list[int]) -> str:
    """A summary cell: the final score (± std over seeds) and the run's variant; its seeds when they
    are not the Share run's."""
    r = t[2]
    score = pm(r["final_average_accuracy"]) if len(r["seeds"]) > 1 else one(r["final_average_accuracy"])
    own = f", seed{'s' * (len(r['seeds']) > 1)} {', '.join(map(str, r['seeds']))}" if r["seeds"] != seeds else ""
    return f"{score} ({_variant(t[1])}{own})"


@table("readme-summary")
def _summary() -> str:
    body = []
    for stream, (folders, ref_name) in SUMMARY.items():
        share, peer, ref = _best(folders, ("share",)), _best(folders, PEERS), _best(folders, (ref_name,))
        if share is None or ref is None:  # a comparison not run (or not finished) yet
            continue
        lora = _best(folders, ("lora-per-task",)) or ref
        sb, lb = mean(share[2]["bytes_per_task"]), mean(lora[2]["bytes_per_task"]) if lora else None
        seeds = share[2]["seeds"]
        cell = functools.partial(_cell, seeds=seeds)
        row = stream if "seed" in stream or len(seeds) == 3 else f"{stream}, seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}"
        # bold: the better continual method of the two (the reference is not continual)
        peer_wins = peer is not None and mean(peer[2]["final_average_accuracy"]) > mean(share[2]["final_average_accuracy"])
        s_cell, p_cell = cell(share), (f"{label(peer[0])} {cell(peer)}" if peer else "not run on these splits yet")
        s_cell, p_cell = (s_cell, f"**{p_cell}**") if peer_wins else (f"**{s_cell}**", p_cell)
        body.append([row, s_cell, p_cell, cell(ref),
                     f"{num(sb)} ({pct_of(sb, lb)} of LoRA)" if lb else num(sb)])
    header = ["stream", "Share, final %", "best peer (InfLoRA, SD-LoRA, DualLoRA)", "LoRA per task (task-incremental) or joint LoRA "
              "(class-incremental ceiling)", "Share adapter bytes / task"]
    return (md(header, body) + "\n\nMean ± sample std over seeds 0, 1, 2 unless marked; each cell is the method's best of the "
            "untuned, validation-tuned and aligned runs on its results page, the better of Share and the best peer in bold "
            "(task-incremental streams score with the task id, "
            "class-incremental ones without; gen5 scores generations by ROUGE-L / exact match). Generated by "
            "`python benchmarks/results_pages.py` from `benchmarks/results/`.")
