"""Learning rates tuned on validation beside the untuned runs: the README's "tuned" tables.

Reads ``sharecl compare`` result folders under ``results/`` — one made with ``--tune-lr``
(its ``compare.json`` holds ``tuned_lr``: every grid point's validation score and the choice)
and the untuned ones (every method at the stream's default rate) — and prints, per method, the
rate chosen on validation with the grid's validation scores, the tuned and untuned test scores
(mean ± sample std over seeds, %), and the tuned run's forgetting and second score (TIL final
accuracy on a class-incremental stream, average incremental accuracy on a task-incremental
one). Nothing is trained or evaluated; the seed lists are checked to match. Where validation
chose the untuned rate and optimiser the row says so (the test runs then repeat the untuned ones).

    python benchmarks/tuned_table.py compare-mnist-cil-tuned compare-mnist-cil

Writes ``results/tuned_table-<tuned folder>.json``.
"""

from __future__ import annotations

import argparse
import json

from _common import METHOD_LABELS, RESULTS, write
from _common import pct_pm as _pm

LABELS = {**METHOD_LABELS, "joint-lora": "joint LoRA (ceiling)"}


def _rate(lr: float, optimizer: str) -> str:
    return f"{'SGD ' if optimizer == 'sgd' else ''}{lr:g}"


def _untuned(folders: list[str]) -> dict[str, tuple[dict, str]]:
    """``{method: (its compare.json entry, folder)}``; a later folder's method replaces an earlier one's."""
    out = {}
    for folder in folders:
        for m, u in json.loads((RESULTS / folder / "compare.json").read_text())["methods"].items():
            out[m] = (u, folder)
    return out


def _untuned_rate(folder: str, method: str, seed: int) -> tuple[float, str] | None:
    f = RESULTS / folder / f"seed-{seed}" / method / "results.json"
    if not f.is_file():
        return None
    tc = json.loads(f.read_text())["train_config"]
    return tc["lr"], tc.get("optimizer", "adamw")


def rows(tuned_folder: str, untuned_folders: list[str]) -> list[dict]:
    """One row per tuned method; raises ValueError when the tuned and untuned runs of a method have different seeds."""
    tuned = json.loads((RESULTS / tuned_folder / "compare.json").read_text())
    untuned = _untuned(untuned_folders)
    out = []
    for m, t in tuned["methods"].items():
        u, folder = untuned.get(m, (None, None))
        if u is not None and u["seeds"] != t["seeds"]:
            raise ValueError(f"{m}: tuned seeds {t['seeds']} but untuned seeds {u['seeds']}")
        choice = tuned["tuned_lr"][m]
        grid = {k: 100 * v for k, v in choice["validation_final_accuracy"].items()}
        old = _untuned_rate(folder, m, t["seeds"][0]) if folder else None
        second = "til_final_average_accuracy" if tuned["scenario"] == "cil" else "average_incremental_accuracy"
        out.append({"method": m, "lr": choice["lr"], "optimizer": choice["optimizer"], "validation": grid,
                    "same_as_untuned": old == (choice["lr"], choice["optimizer"]),
                    "tuned": t["final_average_accuracy"], "untuned": (u or {}).get("final_average_accuracy"), "untuned_from": folder,
                    "forgetting": t["forgetting"], second: t[second], "seeds": t["seeds"]})
    return out


def markdown(table: list[dict], scenario: str) -> str:
    second = "TIL final tuned" if scenario == "cil" else "avg incr tuned"
    key = "til_final_average_accuracy" if scenario == "cil" else "average_incremental_accuracy"
    lines = [f"| method | chosen on validation (validation final %; the grid) | **tuned, test** | untuned, test | "
             f"forgetting tuned | {second} |", "|---|---|---|---|---|---|"]
    for r in table:
        grid = ", ".join(f"{k}: {v:.1f}" for k, v in r["validation"].items())
        same = " (same rate)" if r["same_as_untuned"] else ""
        lines.append(f"| {LABELS.get(r['method'], r['method'])} | {_rate(r['lr'], r['optimizer'])} ({grid}) | "
                     f"{_pm(r['tuned'])} | {_pm(r['untuned'])}{same} | {_pm(r['forgetting'])} | {_pm(r[key])} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tuned", help="results/ folder of the --tune-lr run")
    ap.add_argument("untuned", nargs="+", help="results/ folder(s) of the untuned runs; a later folder's method replaces an earlier one's")
    args = ap.parse_args()
    scenario = json.loads((RESULTS / args.tuned / "compare.json").read_text())["scenario"]
    table = rows(args.tuned, args.untuned)
    print(markdown(table, scenario))
    print(f"\nwritten: {write(f'tuned_table-{args.tuned}', {'tuned': args.tuned, 'untuned': args.untuned, 'rows': table})}")


if __name__ == "__main__":
    main()
