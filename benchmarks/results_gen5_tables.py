"""The gen5 tables (generation on the packaged SmolLM2) of the docs site: Share's option ablation,
the validation-tuned comparison, Share on all linear layers and the comparison before issue 30.

Registered in :data:`results_tables.TABLES` on import (``results_pages.py`` imports this module).
"""

from __future__ import annotations

import json

from results_tables import RESULTS, all_rows, compare_json, compare_table, label, load, machine, md, num, pct_of, run, table
from sharecl.compare import at_grid_edge

#: peers run on the test split after the tuned comparison, at the rate their validation trials chose
#: (``--method-lr``: the trials live in compare-gen5-tuned/tune/ or, for peers tuned later, in this folder's tune/)
LATER = "compare-gen5-tuned-peers"


@table("gen5-tuned")
def _gen5_tuned() -> str:
    c = compare_json("compare-gen5-tuned")
    later = (RESULTS / LATER / "compare.json").exists()
    rows = all_rows("compare-gen5-tuned") + (all_rows(LATER) if later else [])
    tasks = [t["name"] for t in json.loads((RESULTS / "compare-gen5-tuned" / f"seed-{c['methods'][rows[0][2]]['seeds'][0]}" / "manifest.json")
                                          .read_text())["tasks"]]
    per_task = md(["method (first seed)", *tasks], [[lab, *(f"{100 * v:.1f}" for v in run(f, compare_json(f)["methods"][m]["seeds"][0], m)
                                                            ["accuracy_matrix"][-1])] for lab, f, m in rows])
    grid = "; ".join(f"{label(m)} **{t['lr']:g}** (" + ", ".join(f"{k}: {100 * v:.1f}" for k, v in t["validation_final_accuracy"].items()) + ")"
                     for m, t in c.get("tuned_lr", {}).items())
    trials = validation_trials("compare-gen5-tuned", LATER)
    for m, lr in (compare_json(LATER).get("method_lr", {}) if later else {}).items():
        grid += (f"; {label(m)} **{lr:g}** (" + ", ".join(f"{r:g}: {100 * v:.1f}" for r, v in sorted(trials.get(m, {}).items()))
                 + ": run on the test split later, at this rate)")
    seeds = {tuple(compare_json(f)["methods"][m]["seeds"]) for _, f, m in rows}
    one_seed = next(iter(seeds))[0] if seeds == {next(iter(seeds))} and len(next(iter(seeds))) == 1 else None
    tested = set(c.get("tuned_lr", {})) | ({m for _, _, m in all_rows(LATER)} if later else set())
    return (compare_table(rows, lora_ref=("compare-gen5-tuned", "lora-per-task"), seed=one_seed) + "\n\nEach task's score after the last task:\n\n"
            + per_task + f"\n\nLearning rates chosen on the validation split of seed 0 (validation score %): {grid}."
            + untested_trials("compare-gen5-tuned", tested))


def validation_trials(*folders: str) -> dict[str, dict[float, float]]:
    """``{method: {lr: validation final score}}`` of the AdamW trials under each ``folder/tune/``."""
    trials: dict[str, dict[float, float]] = {}
    for f in sorted(f for folder in folders for f in (RESULTS / folder / "tune").glob("lr-*/*/results.json")):
        method, lr = f.parent.name, f.parent.parent.name.removeprefix("lr-")
        if "-" not in lr:  # an SGD trial's folder is lr-X-sgd
            trials.setdefault(method, {})[float(lr)] = json.loads(f.read_text())["final_average_accuracy"]
    return trials


def untested_trials(folder: str, tested: set[str]) -> str:
    """A sentence listing the validation trials under ``folder/tune/`` of methods not yet run on the
    test split (their rows come when they are), or "" when there are none."""
    trials = {m: t for m, t in validation_trials(folder).items() if m not in tested}
    if not trials:
        return ""
    said = "; ".join(f"{label(m)} " + ", ".join(f"{lr:g}: {100 * v:.1f}" for lr, v in sorted(t.items())) for m, t in trials.items())
    return f" Validation trials of methods not yet run on the test split (seed 0, validation score %): {said}."


def last_row_means(folder: str, method: str) -> list[float]:
    """Each task's score after the last task, mean over the folder's seeds (fractions)."""
    seeds = compare_json(folder)["methods"][method]["seeds"]
    rows = [run(folder, s, method)["accuracy_matrix"][-1] for s in seeds]
    return [sum(col) / len(col) for col in zip(*rows)]


@table("gen5-all-linear")
def _gen5_all_linear() -> str:
    folder = "compare-gen5-all-linear"
    rows = [("Share, all linear layers (k 10, p 2)", folder, "share"), ("Share, q_proj/v_proj (k 10, p 4)", "compare-gen5-tuned", "share"),
            ("LoRA per task, q_proj/v_proj", "compare-gen5-tuned", "lora-per-task")]
    if (RESULTS / LATER / "compare.json").exists():  # the continual peers run on these splits, at their own tuned rates
        rows += [(f"{lab}, q_proj/v_proj", f, m) for lab, f, m in all_rows(LATER) if len(compare_json(f)["methods"][m]["seeds"]) > 1]
    tasks = [t["name"] for t in json.loads((RESULTS / folder / f"seed-{compare_json(folder)['methods']['share']['seeds'][0]}"
                                            / "manifest.json").read_text())["tasks"]]
    per_task = md(["method (mean over seeds)", *tasks], [[lab, *(f"{100 * v:.1f}" for v in last_row_means(f, m))] for lab, f, m in rows])
    all_trials = validation_trials(folder)
    trials = all_trials.get("share", {})
    said = ", ".join(f"{lr:g}: {100 * v:.2f}" for lr, v in sorted(trials.items()))
    lr = compare_json(folder).get("tuned_lr", {}).get("share", {}).get("lr")
    lora = all_trials.get("lora-per-task", {})
    best = max(lora, key=lora.get) if lora else None
    edge = " — the best rate at the grid's edge" if best is not None and at_grid_edge(best, list(lora)) else ""
    same_layers = ("" if not lora else " LoRA per task on the same (all linear) layers, validation trials (seed 0, validation score %): "
                   + ", ".join(f"{r:g}: {100 * v:.2f}" for r, v in sorted(lora.items()))
                   + f" ({num(load(f'{folder}/tune/lr-{best:g}/lora-per-task/results.json')['bytes_per_task'])} "
                   f"bytes a task{edge}); not run on the test split yet.")
    return (compare_table(rows, lora_ref=("compare-gen5-tuned", "lora-per-task")) + "\n\nEach task's score after the last task:\n\n"
            + per_task + f"\n\nShare on all linear layers: validation trials (seed 0, validation score %) {said}; rate run on the "
            f"test split {lr:g}." + same_layers)


@table("gen5-untuned")
def _gen5_untuned() -> str:
    order = ["zero-shot", "share", "inflora", "sd-lora", "dual-lora", "lora-per-task", "seq-lora", "joint-lora"]
    return compare_table([(label(m), "compare-gen5", m) for m in order], lora_ref=("compare-gen5", "lora-per-task"))



# --------------------------------------------------------------------- Share on a causal LM
#: what each ablation trial changes, in words (trials not listed show their option values)
TRIAL_WORDS = {"base": "today's setting before issue 30 (k 10, p 2, φ 2, lr 1e-3, q/v)", "lora-per-task": "LoRA per task (the target)"}
#: trials named ``al-…`` start from the causal-LM default chosen by the first round (``r10-all-linear``)
DEFAULT_LM = {"coeff_lr_ratio": 10.0, "target_modules": "all-linear"}


def _changes(row: dict, base: dict, budget: dict) -> str:
    cfg, tc = row["config"], row["train_config"]
    keys = ("r", "p", "k", "phi", "init", "phi_init", "merge_finetune_steps", "coeff_lr_ratio", "phi_lr_ratio", "target_modules")
    parts = []
    for k in keys:
        if k not in cfg:
            continue
        v, b = cfg[k], base.get(k, {"coeff_lr_ratio": 1.0, "phi_lr_ratio": 1.0, "init": "zero", "phi_init": "complement",
                                    "merge_finetune_steps": 0, "target_modules": ["q_proj", "v_proj"]}.get(k))
        if v != b and v is not None:
            parts.append(f"{k} {v if not isinstance(v, list) else '/'.join(x.split('_')[0] for x in v)}")
    for k in ("lr", "steps"):
        if tc.get(k) != budget.get(k):
            parts.append(f"{k} {tc[k]:g}")
    return ", ".join(parts) or "—"


@table("gen5-share-ablation")
def _gen5_ablation() -> str:
    d = load("share_lm_ablation.json")
    rows = d["rows"]
    ref = next((r["bytes_per_task"] for r in rows if r["method"] == "lora-per-task" and r["trial"] == "lora-per-task"), None)
    tasks = list(rows[0]["per_task"])
    body = []
    for r in rows:
        if r["trial"].startswith("al-"):  # one change from the causal-LM default
            what = "the default (all linear layers, k 10, p 2, 10×): " + _changes(r, {**d["base"], **DEFAULT_LM}, d["budget"])
        else:
            what = TRIAL_WORDS.get(r["trial"]) or ((label(r["method"]) + ": " if r["method"] != "share" else "")
                                                  + _changes(r, d["base"], d["budget"]))
        body.append([r["trial"], what, f"{100 * r['validation_score']:.2f}", *(f"{100 * v:.1f}" for v in r["per_task"].values()),
                     num(r["bytes_per_task"]), pct_of(r["bytes_per_task"], ref) if ref else "—", f"{r['train_seconds']:.0f}"])
    header = ["trial", "change from today's setting", "validation score %", *tasks, "bytes / task", "of LoRA's", "train s"]
    env = rows[0]["environment"]
    return (md(header, body) + f"\n\nSeed 0, gen5's validation split (200 pairs per task), {d['budget']['steps']} steps of "
            f"{d['budget']['batch_size']} per task, precision {rows[0]['precision']}, one thread per trial. Source: "
            f"`benchmarks/results/share_lm_ablation.json` (`python benchmarks/bench_share_lm.py --queue FILE`; {machine(env)}).")
