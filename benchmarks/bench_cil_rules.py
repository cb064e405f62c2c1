"""Share in class-incremental streams: which task-identification score works best.

Evaluation only: loads the Share stores that ``sharecl compare --stream STREAM`` left
in ``RUNS/seed-<s>/share/store`` and scores every test input of every task with no task id
under each rule of :meth:`sharecl.methods.share.ShareMethod.cil_logits`. Reports the final
class-incremental accuracy and the task-identification accuracy (how often the winning
class belongs to the right task), per seed and averaged, on the test splits and on the
validation splits; ``chosen_on_validation`` names the rule a user should pick (best mean
validation accuracy), so the choice never looks at test data.

    python benchmarks/bench_cil_rules.py [--stream wordnet-cil] [--runs runs/compare-wordnet-cil]
        [--scores aligned] [--top-tasks 1,2]

``--top-tasks`` also scores aligned stores with ``ShareConfig.cil_top_tasks`` (each input run under
its M most likely tasks only); ``seconds`` is the wall time of scoring each split (compare rules
within one run: the machine is shared).

Writes ``results/cil_rules.json`` (wordnet-cil) or ``results/cil_rules-<stream>.json``. The
``prototype`` rule needs stores whose tasks were learned with class prototypes (skipped otherwise).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from _common import table, write
from sharecl.data.streams import get_stream
from sharecl.methods.share import CIL_SCORES
from sharecl.methods.share_cil import set_top_tasks
from sharecl.store import load_store
from sharecl.train import predict_logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stream", default="wordnet-cil")
    ap.add_argument("--runs", default=None, help="default: runs/compare-<stream>")
    ap.add_argument("--out", default=None, help="results/<out>.json (default: cil_rules[-<stream>])")
    ap.add_argument("--top-tasks", default="", help="aligned stores: also score 'aligned@topM' for these M "
                    "(ShareConfig.cil_top_tasks: each input runs under its M most likely tasks only), e.g. 1,2")
    ap.add_argument("--scores", default=",".join(CIL_SCORES), help="the rules to score (default: every one)")
    args = ap.parse_args()
    tops = [int(x) for x in args.top_tasks.split(",") if x.strip()]
    scores = [x for x in args.scores.split(",") if x]
    if set(scores) - set(CIL_SCORES):
        ap.error(f"--scores: unknown {sorted(set(scores) - set(CIL_SCORES))}; choose from {', '.join(CIL_SCORES)}")
    rules = [(score, score, None) for score in scores] + [(f"aligned@top{m}", "aligned", m) for m in tops]
    args.runs = args.runs or f"runs/compare-{args.stream}"
    rows = []
    for d in sorted(Path(args.runs).glob("seed-*/share/store")):
        seed = int(d.parent.parent.name.split("-")[1])
        method = load_store(d)
        stream = get_stream(args.stream, seed=seed)
        offsets = method.class_offsets()
        bounds = torch.tensor([offsets[t.name] for t in stream] + [sum(t.num_classes for t in stream)])
        for label, score, top in rules:
            if score == "prototype" and len(method.prototypes) < len(method.task_names):
                print(f"seed {seed}: no class prototypes in {d}; prototype rule skipped")
                continue
            if score == "mahalanobis" and (len(method.class_stats) < len(method.task_names) or len(method.taskid_heads.heads)):
                print(f"seed {seed}: no per-task class statistics in {d} (learned without cil_score=mahalanobis); rule skipped")
                continue
            if score == "aligned" and len(method.taskid_heads.heads) < len(method.task_names):
                print(f"seed {seed}: no task-identification heads in {d} (learned without --align); rule skipped")
                continue
            set_top_tasks(method, top)
            row = {"seed": seed, "score": label}
            for split in ("test", "val"):
                t0 = time.perf_counter()
                accs, tid = [], []
                for j, t in enumerate(stream):
                    xs, ys = (t.test_inputs, t.test_labels) if split == "test" else (t.val_inputs, t.val_labels)
                    pred = predict_logits(lambda b, method=method, score=score: method.cil_logits(b, score=score), xs, 64).argmax(-1)
                    accs.append((pred == torch.tensor(ys) + offsets[t.name]).float().mean().item())
                    task_of = torch.bucketize(pred, bounds, right=True) - 1
                    tid.append((task_of == j).float().mean().item())
                suffix = "" if split == "test" else "_val"
                row.update({f"final_cil_acc{suffix}": 100 * statistics.fmean(accs), f"task_id_acc{suffix}": 100 * statistics.fmean(tid),
                            f"seconds{suffix}": time.perf_counter() - t0})
            set_top_tasks(method, None)
            rows.append(row)
            print(rows[-1], flush=True)
    summary = []
    for label, _, _ in rules:
        sel = [r for r in rows if r["score"] == label]
        if sel:
            summary.append({"score": label, "seeds": len(sel),
                            **{k: statistics.fmean(r[k] for r in sel)
                               for k in ("final_cil_acc_val", "task_id_acc_val", "final_cil_acc", "task_id_acc", "seconds")}})
    print(table(summary, ["score", "seeds", "final_cil_acc_val", "task_id_acc_val", "final_cil_acc", "task_id_acc", "seconds"]))
    chosen = max(summary, key=lambda r: r["final_cil_acc_val"])["score"] if summary else None
    print(f"chosen on validation: {chosen}")
    name = args.out or ("cil_rules" if args.stream == "wordnet-cil" else f"cil_rules-{args.stream}")
    print("written:", write(name, {"stream": args.stream, "runs": args.runs, "per_seed": rows, "summary": summary,
                                   "chosen_on_validation": chosen}))


if __name__ == "__main__":
    main()
