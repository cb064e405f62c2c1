"""Images per second: the input pipeline, and training / inference of every method on the ViT.

Part 1 — preparing batches of 64 Fashion-MNIST images (28 × 28 grey) for a 56 × 56 model:
the uint8 cache path (:func:`~sharecl.vision.transforms.pixel_batch`, one batched resize in
torch), the per-image PIL evaluation chain, and the per-image PIL training chain (random
resized crop + flip).

Part 2 — the converted DINOv2 ViT-S/14 at ``--size`` pixels, q/v adapters: each method learns
fmnist-cil's first task for one step, begins the second, then we time (interleaved, medians)
a training step on 16 images (forward + backward + AdamW) and a no-grad forward of 64 images
with the task id; images/s = batch / seconds.

    python benchmarks/bench_images.py [--size 56] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from torch.nn import functional as F

from _common import table, write
from sharecl.backbone import load_encoder
from sharecl.data.images import fashion_mnist
from sharecl.data.streams import get_stream
from sharecl.methods import build_method
from sharecl.train import TrainConfig
from sharecl.vision.convert import default_vit_path
from sharecl.vision.transforms import ImagePipeline, pixel_batch

METHODS = ["share", "inflora", "sd-lora", "dual-lora", "lora-per-task", "seq-lora", "head-only"]


def timed(fn, rounds):
    fn()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def pipeline_rows(size, rounds):
    x, _ = fashion_mnist("test")
    batch = x[:64]
    pipe = ImagePipeline(size)
    rng = np.random.default_rng(0)
    rows = []
    for name, fn in (("uint8 cache, batched (pixel_batch)", lambda: pixel_batch(batch, size)),
                     ("PIL evaluation chain, per image", lambda: torch.stack([pipe.eval_one(a) for a in batch])),
                     ("PIL training chain (crop + flip), per image", lambda: pipe(list(batch), rng))):
        s = timed(fn, rounds)
        rows.append({"what": name, "seconds_per_64": s, "images_per_s": 64 / s})
    return rows


def method_rows(size, rounds):
    s = get_stream("fmnist-cil", seed=0, train_per_class=32, test_per_class=32, image_size=size)
    cfg = TrainConfig(steps=1, batch_size=16, lr=1e-3, head_lr=1e-3)
    prepared = {}
    for name in METHODS:
        m = build_method(name, load_encoder(str(default_vit_path()), image_size=size), seed=0)
        m.begin_stream(2)
        m.learn(s.tasks[0], cfg, progress=False)
        groups = m.begin_task(s.tasks[1], cfg)
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)
        t = s.tasks[1]
        xs, ys = t.train_inputs[:16], torch.tensor(t.train_labels[:16])
        test = (s.tasks[0].test_inputs + t.test_inputs)[:64]

        def step(m=m, opt=opt, xs=xs, ys=ys, t=t):
            loss = F.cross_entropy(m.logits(xs, t.name, training=True), ys)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def infer(m=m, test=test, name=s.tasks[0].name):
            with torch.no_grad():
                m.logits(test, name)

        prepared[name] = (step, infer)
    times = {n: ([], []) for n in METHODS}
    for _ in range(rounds):  # interleaved: every method sees the same machine load
        for n, (step, infer) in prepared.items():
            for fn, acc in ((step, times[n][0]), (infer, times[n][1])):
                t0 = time.perf_counter()
                fn()
                acc.append(time.perf_counter() - t0)
    return [{"method": n, "train_images_per_s": 16 / statistics.median(a), "infer_images_per_s": 64 / statistics.median(b),
             "train_step_s": statistics.median(a), "infer_64_s": statistics.median(b)} for n, (a, b) in times.items()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=56)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    pipe = pipeline_rows(a.size, a.rounds * 4)
    print(table(pipe, ["what", "seconds_per_64", "images_per_s"]), flush=True)
    methods = method_rows(a.size, a.rounds)
    print(table(methods, ["method", "train_images_per_s", "infer_images_per_s", "train_step_s", "infer_64_s"]))
    print(write("images", {"size": a.size, "rounds": a.rounds, "threads": torch.get_num_threads(), "pipeline": pipe,
                           "methods": methods}))


if __name__ == "__main__":
    main()
