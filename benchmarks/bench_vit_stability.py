"""Training stability of the first LoRA on the packaged ViT: learning rate, warm-up, clipping.

Two fmnist-cil tasks (seed 0) with Share on the converted DINOv2 at 56 px, batch 16, for each
variant: the first task's loss every 4th step, the mean and maximum of its last 10 losses, the
task-incremental accuracy of both tasks and the class-incremental accuracy under Share's rules.
Variants: lr 5e-3 and 1e-3, each plain, with a 10-step linear warm-up and with the gradient
norm clipped at 1.0; at 64 images per class / 40 steps (the slow test's budget) and at 200 / 80
(the command line's image defaults).

    python benchmarks/bench_vit_stability.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write  # noqa: E402


def run(lr: float, per_class: int, steps: int, **train) -> dict:
    import sharecl.methods.base as base
    import sharecl.methods.share as share_mod
    from sharecl.backbone import load_encoder
    from sharecl.data.streams import get_stream
    from sharecl.methods.share import ShareMethod
    from sharecl.runner import evaluate_cil
    from sharecl.train import TrainConfig, evaluate, train_steps
    from sharecl.vision.convert import default_vit_path

    losses = []

    def recording(*a, **k):
        out = train_steps(*a, **k)
        losses.append(out)
        return out

    base.train_steps = share_mod.train_steps = recording
    try:
        s = get_stream("fmnist-cil", seed=0, train_per_class=per_class, test_per_class=40)
        m = ShareMethod(load_encoder(str(default_vit_path()), image_size=56), seed=0)
        m.begin_stream(2)
        cfg = TrainConfig(steps=steps, batch_size=16, lr=lr, head_lr=lr, **train)
        for t in s.tasks[:2]:
            m.learn(t, cfg, progress=False)
    finally:
        base.train_steps = share_mod.train_steps = train_steps
    til = [evaluate(lambda xs, n=t.name: m.logits(xs, n), t, 64) for t in s.tasks[:2]]
    offsets, cil = m.class_offsets(), {}
    for rule in ("prototype", "energy"):
        m.config.cil_score = rule
        cil[rule] = [evaluate_cil(m, t, offsets[t.name], 64) for t in s.tasks[:2]]
    first = losses[0]
    return {"lr": lr, "train_per_class": per_class, "steps": steps, **train, "til": til, "cil": cil,
            "loss_every_4th_step": [round(x, 3) for x in first[::4]], "last10_mean": sum(first[-10:]) / 10,
            "last10_max": max(first[-10:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="only the slow test's budget")
    a = ap.parse_args()
    budgets = [(64, 40)] + ([] if a.quick else [(200, 80)])
    rows = []
    for per_class, steps in budgets:
        for lr in (5e-3, 1e-3):
            for train in ({}, {"warmup_steps": 10}, {"max_grad_norm": 1.0}):
                r = run(lr, per_class, steps, **train)
                r["variant"] = ", ".join(f"{k}={v}" for k, v in train.items()) or "plain"
                r["TIL"] = " / ".join(f"{x:.3f}" for x in r["til"])
                r["CIL prototype"] = " / ".join(f"{x:.3f}" for x in r["cil"]["prototype"])
                rows.append(r)
                print(table([r], ["train_per_class", "steps", "lr", "variant", "last10_mean", "last10_max", "TIL",
                                  "CIL prototype"]).splitlines()[-1], flush=True)
    print(table(rows, ["train_per_class", "steps", "lr", "variant", "last10_mean", "last10_max", "TIL", "CIL prototype"]))
    print(f"raw results: {write('vit_stability', {'rows': rows})}")


if __name__ == "__main__":
    main()
