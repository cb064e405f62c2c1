"""Share in class-incremental streams: which task-identification score works best.

Evaluation only: loads the Share stores that ``sharecl compare --stream STREAM`` left
in ``RUNS/seed-<s>/share/store`` and scores every test input of every task with no task id
under each rule of :meth:`sharecl.methods.share.ShareMethod.cil_logits`. Reports the final
class-incremental accuracy and the task-identification accuracy (how often the winning
class belongs to the right task), per seed and averaged, on the test splits and on the
validation splits; ``chosen_on_validation`` names the rule a user should pick (best mean
validation accuracy), so the choice never looks at test data.

    python benchmarks/bench_cil_rules.py [--stream wordnet-cil] [--runs runs/compare-wordnet-cil]

Writes ``results/cil_rules.json`` (wordnet-cil) or ``results/cil_rules-<stream>.json``. The
``prototype`` rule needs stores whose tasks were learned with class prototypes (skipped otherwise).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from _common import table, write
from sharecl.data.streams import get_stream
from sharecl.methods.share import CIL_SCORES
from sharecl.store import load_store
from sharecl.train import predict_logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stream", default="wordnet-cil")
    ap.add_argument("--runs", default=None, help="default: runs/compare-<stream>")
    ap.add_argument("--out", default=None, help="results/<out>.json (default: cil_rules[-<stream>])")
    args = ap.parse_args()
    args.runs = args.runs or f"runs/compare-{args.stream}"
    rows = []
    for d in sorted(Path(args.runs).glob("seed-*/share/store")):
        seed = int(d.parent.parent.name.split("-")[1])
        method = load_store(d)
        stream = get_stream(args.stream, seed=seed)
        offsets = method.class_offsets()
        bounds = torch.tensor([offsets[t.name] for t in stream] + [sum(t.num_classes for t in stream)])
        for score in CIL_SCORES:
            if score == "prototype" and len(method.prototypes) < len(method.task_names):
                print(f"seed {seed}: no class prototypes in {d}; prototype rule skipped")
                continue
            if score == "mahalanobis" and (len(method.class_stats) < len(method.task_names) or len(method.taskid_heads.heads)):
                print(f"seed {seed}: no per-task class statistics in {d} (learned without cil_score=mahalanobis); rule skipped")
                continue
            if score == "aligned" and len(method.taskid_heads.heads) < len(method.task_names):
                print(f"seed {seed}: no task-identification heads in {d} (learned without --align); rule skipped")
                continue
            row = {"seed": seed, "score": score}
            for split in ("test", "val"):
                accs, tid = [], []
                for j, t in enumerate(stream):
                    xs, ys = (t.test_inputs, t.test_labels) if split == "test" else (t.val_inputs, t.val_labels)
                    pred = predict_logits(lambda b, method=method, score=score: method.cil_logits(b, score=score), xs, 64).argmax(-1)
                    accs.append((pred == torch.tensor(ys) + offsets[t.name]).float().mean().item())
                    task_of = torch.bucketize(pred, bounds, right=True) - 1
                    tid.append((task_of == j).float().mean().item())
                suffix = "" if split == "test" else "_val"
                row.update({f"final_cil_acc{suffix}": 100 * statistics.fmean(accs), f"task_id_acc{suffix}": 100 * statistics.fmean(tid)})
            rows.append(row)
            print(rows[-1], flush=True)
    summary = []
    for score in CIL_SCORES:
        sel = [r for r in rows if r["score"] == score]
        if sel:
            summary.append({"score": score, "seeds": len(sel),
                            **{k: statistics.fmean(r[k] for r in sel)
                               for k in ("final_cil_acc_val", "task_id_acc_val", "final_cil_acc", "task_id_acc")}})
    print(table(summary, ["score", "seeds", "final_cil_acc_val", "task_id_acc_val", "final_cil_acc", "task_id_acc"]))
    chosen = max(summary, key=lambda r: r["final_cil_acc_val"])["score"] if summary else None
    print(f"chosen on validation: {chosen}")
    name = args.out or ("cil_rules" if args.stream == "wordnet-cil" else f"cil_rules-{args.stream}")
    print("written:", write(name, {"stream": args.stream, "runs": args.runs, "per_seed": rows, "summary": summary,
                                   "chosen_on_validation": chosen}))


if __name__ == "__main__":
    main()
