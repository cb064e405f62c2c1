"""One training loop and one evaluation loop for every method.

A method exposes ``logits(batch, task_name)`` and the list of parameters to train; this
module samples seeded mini-batches, steps AdamW on cross-entropy, shows a progress bar,
and refuses a non-finite loss. Under ``torchrun`` the trained parameters are wrapped in
``DistributedDataParallel`` and each rank takes its shard of every global batch and of every
test split (:mod:`sharecl.distributed`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import psutil
import torch
from torch import nn
from tqdm.auto import tqdm

from sharecl import distributed as dist
from sharecl.data.tasks import Task, TaskLike

__all__ = ["DEFAULT_LR", "TrainConfig", "NonFiniteLossError", "train_steps", "predict_logits", "evaluate", "evaluate_many", "PeakRSS"]


#: Learning rate by the backbone's modality when none is given (measured: README, "Training stability").
DEFAULT_LR = {"text": 5e-3, "image": 1e-3, "lm": 1e-3}


@dataclass
class TrainConfig:
    """Training budget shared by all methods of a comparison.

    Attributes:
        steps: optimiser steps per task.
        batch_size: examples per step.
        lr: AdamW learning rate for adapter parameters; None (the default) = the backbone's
            modality default, :data:`DEFAULT_LR` (5e-3 for text, 1e-3 for images: at 5e-3 the
            first LoRA on the packaged ViT oscillates and can end at chance; warm-up and
            clipping do not prevent it, a lower rate does — see the README; 1e-3 for causal LMs,
            where a PEFT LoRA on SmolLM2 learns every gen5 task in 30 steps, not tuned further).
        head_lr: AdamW learning rate for the task head; None = ``lr``.
        weight_decay: AdamW weight decay (adapters and heads).
        eval_batch_size: examples per forward pass at evaluation.
        max_length: tokens per text (longer texts are truncated).
        seed: seeds batch order and every random init.
        warmup_steps: linear learning-rate warm-up over the first steps (0: none); every
            parameter group's rate rises from ``1/(warmup_steps+1)`` of its value to all of it.
        max_grad_norm: clip the global gradient norm of the trained parameters to this value
            (``torch.nn.utils.clip_grad_norm_``); None: no clipping.
        augment: images only: train on :func:`sharecl.vision.transforms.augment_array` views
            (random resized crop + horizontal flip), drawn from a generator seeded by the batch
            generator, for the whole global batch before it is sharded across ranks.
        optimizer: ``adamw`` (the default, every method alike) or ``sgd`` (momentum 0.9, as
            SD-LoRA's official code trains); ``lr``, ``head_lr`` and ``weight_decay`` apply to either.
        align: class-incremental streams: after each task, keep its classes' feature means and
            covariances and re-train every head on features sampled from all seen classes'
            Gaussians (SLCA's classifier alignment, :mod:`sharecl.align`).
        align_steps, align_samples, align_lr: that re-training's AdamW steps, features drawn
            per class per step, and learning rate.
        align_rank: keep each class covariance as its top-``align_rank`` eigen-directions plus a
            diagonal (:func:`sharecl.align.low_rank_statistics`); None: the full covariance.
        align_recompute: measurement only, not continual learning: recompute every seen task's
            class statistics from its training data before each alignment (the method keeps the
            data), instead of keeping them as computed when the task was learned.
    """

    steps: int = 60
    batch_size: int = 16
    lr: float | None = None
    head_lr: float | None = None
    weight_decay: float = 0.0
    eval_batch_size: int = 64
    max_length: int = 64
    seed: int = 0
    warmup_steps: int = 0
    max_grad_norm: float | None = None
    augment: bool = False
    optimizer: str = "adamw"
    align: bool = False
    align_steps: int = 200
    align_samples: int = 32
    align_lr: float = 1e-3
    align_rank: int | None = None
    align_recompute: bool = False

    def resolved(self, modality: str) -> TrainConfig:
        """A copy with ``lr`` / ``head_lr`` filled in for ``modality`` (``text``, ``image`` or ``lm``) where None.

        Raises:
            ValueError: for an unknown modality.
        """
        if modality not in DEFAULT_LR:
            raise ValueError(f"modality must be one of {sorted(DEFAULT_LR)}, got {modality!r}")
        lr = DEFAULT_LR[modality] if self.lr is None else self.lr
        return replace(self, lr=lr, head_lr=lr if self.head_lr is None else self.head_lr)

    def __post_init__(self):
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be ≥ 0, got {self.warmup_steps}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 (or None for no clipping), got {self.max_grad_norm}")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the task is not stored."""


class PeakRSS:
    """Tracks the peak resident set size (bytes) of this process while sampled."""

    def __init__(self):
        self._proc = psutil.Process()
        self.peak = self._proc.memory_info().rss

    def sample(self) -> None:
        self.peak = max(self.peak, self._proc.memory_info().rss)


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """Yield ``steps`` index batches from seeded epoch-wise permutations of ``range(n)``."""
    perm, pos = torch.randperm(n, generator=generator), 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=generator), 0
        yield perm[pos: pos + batch_size].tolist()
        pos += batch_size


class _Trained(nn.Module):
    """The parameters a task trains, as one module, so ``DistributedDataParallel`` can wrap
    them: its forward is the method's forward, which reaches the same parameter objects."""

    def __init__(self, forward: Callable, params: list[nn.Parameter]):
        super().__init__()
        self._forward = forward
        self.trained = nn.ParameterList(params)

    def forward(self, inputs: list, labels, reduction: str):
        return self._forward(inputs, labels, reduction)


def _ddp(forward: Callable, params: list[nn.Parameter], some_unused: bool) -> Callable:
    """``forward`` through ``DistributedDataParallel`` over ``params`` when a process group is active.

    Construction broadcasts rank 0's values of ``params``; every backward then averages their
    gradients over ranks. ``some_unused`` (DDP's ``find_unused_parameters``) lets a step leave
    some parameters without a gradient (joint LoRA's batches need not hold every task).
    """
    if not dist.is_distributed():
        return forward
    from torch.nn.parallel import DistributedDataParallel

    dev = params[0].device
    return DistributedDataParallel(_Trained(forward, params), device_ids=[dev] if dev.type == "cuda" else None,
                                   find_unused_parameters=some_unused)


def train_steps(forward: Callable, param_groups: Sequence[dict], task: TaskLike, cfg: TrainConfig,
                *, steps: int | None = None, desc: str = "", generator: torch.Generator | None = None,
                rss: PeakRSS | None = None, progress: bool = True, some_unused: bool = False) -> list[float]:
    """Train on ``task``'s training split; returns the loss of every step (the mean over the global
    batch's examples, or target tokens for a generation task).

    Under ``torchrun`` (:mod:`sharecl.distributed`) every rank draws the same global batch of
    ``cfg.batch_size`` indices and takes its interleaved shard; each rank's loss is its summed
    loss × world size / the global batch's count (examples, or target tokens, summed over ranks),
    so DDP's gradient average equals the gradient of the global batch's mean loss, as one process
    would compute it.

    Args:
        forward: ``forward(inputs, labels, reduction) -> (loss, count)`` on a list of raw inputs
            and their labels (None for a generation task): the task objective's
            :meth:`~sharecl.objectives.Objective.batch_loss` (``ContinualMethod.training_forward``).
        param_groups: AdamW parameter groups (``{"params": [...], "lr": ...}``).
        steps: overrides ``cfg.steps``.
        some_unused: some trained parameters may get no gradient in a step (DDP must look for them).

    Raises:
        NonFiniteLossError: at the first NaN/inf loss, naming the task and the step (on every rank).
        ValueError: if the global batch is smaller than the number of ranks.
    """
    steps = cfg.steps if steps is None else steps
    if cfg.lr is None:
        raise ValueError("TrainConfig.lr is None: call cfg.resolved('text' or 'image') first (ContinualMethod.learn does)")
    groups = [g for g in param_groups if any(p.requires_grad for p in g["params"])]
    if not groups or steps <= 0:
        return []
    params = list({id(p): p for g in groups for p in g["params"] if p.requires_grad}.values())
    device, world = params[0].device, dist.world_size()
    batch = min(cfg.batch_size, len(task.train_inputs))
    if batch < world:
        raise ValueError(f"a global batch of {batch} examples cannot be shared by {world} processes; "
                         f"raise --batch-size to at least {world} or launch fewer processes")
    model = _ddp(forward, params, some_unused)
    opt: torch.optim.Optimizer
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {cfg.optimizer!r}")
    warm = cfg.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / (warm + 1))) if warm else None
    gen = generator or torch.Generator().manual_seed(cfg.seed)
    aug = None
    if cfg.augment:
        from sharecl.vision.transforms import augment_array

        first = task.train_inputs[0]
        if not isinstance(first[1] if isinstance(first, tuple) else first, np.ndarray):
            raise ValueError(f"augment applies to images; task {task.name!r} holds {type(first).__name__} inputs")
        aug_rng = np.random.default_rng(int(torch.randint(2 ** 62, (1,), generator=gen)))

        def aug(xs: list) -> list:  # joint LoRA's inputs are (task index, image) pairs
            return [(x[0], augment_array(x[1], aug_rng)) if isinstance(x, tuple) else augment_array(x, aug_rng) for x in xs]
    has_labels = len(getattr(task, "train_labels", None) or []) == len(task.train_inputs)
    labels = torch.tensor(task.train_labels, device=device) if has_labels else None
    losses = []
    bar = tqdm(_batches(len(task.train_inputs), batch, steps, gen),
               total=steps, desc=desc or f"train {task.name}", disable=not (progress and dist.is_main()), leave=False,
               dynamic_ncols=True)
    for step, idx in enumerate(bar):
        xs = [task.train_inputs[i] for i in idx]
        idx, xs = list(dist.shard(idx)), list(dist.shard(aug(xs) if aug is not None else xs))
        ys = labels[idx] if labels is not None else None
        if world == 1:
            loss, _ = model(xs, ys, "mean")
            report = loss.detach()
        else:
            total, count = model(xs, ys, "sum")
            count = dist.all_reduce_sum(count.detach().clone()).item()  # the global batch's examples or tokens
            loss = total * (world / count)
            report = dist.all_reduce_sum(total.detach().clone()) / count
        if not torch.isfinite(report):
            raise NonFiniteLossError(
                f"loss became {report.item()} at step {step} of task {task.name!r}; lower the learning rate "
                f"(now {cfg.lr}) or check the data; nothing was stored")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(report.item())
        if rss is not None:
            rss.sample()
        if step % 5 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


@torch.no_grad()
def predict_logits(forward: Callable[[list], torch.Tensor], inputs: list, batch_size: int) -> torch.Tensor:
    """Logits ``(N, C)`` for ``inputs`` in batches (no gradients)."""
    outs = [forward(inputs[i: i + batch_size]) for i in range(0, len(inputs), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)


def evaluate(forward: Callable[[list], torch.Tensor], task: Task, batch_size: int, offset: int = 0) -> float:
    """Accuracy (fraction in [0, 1]) on ``task``'s test split: ``argmax forward(x) == offset + label``.

    Under ``torchrun`` each rank scores its interleaved shard and the counts are summed, so
    every rank returns the accuracy over the whole split.
    """
    return evaluate_many(lambda xs: [forward(xs)], task, batch_size, [offset])[0]


def evaluate_many(forward: Callable[[list], list[torch.Tensor]], task: Task, batch_size: int, offsets: list[int]) -> list[float]:
    """:func:`evaluate` for several scores from one pass: ``forward`` returns one logits tensor
    per entry of ``offsets`` (e.g. the task's head and every head, from one backbone forward);
    accuracy ``j`` counts ``argmax forward(x)[j] == offsets[j] + label``. NaN for an empty split."""
    if not task.test_inputs:
        return [float("nan")] * len(offsets)
    inputs, labels = list(dist.shard(task.test_inputs)), list(dist.shard(task.test_labels))
    counts = torch.zeros(len(offsets) + 1, dtype=torch.float64)
    if inputs:
        outs = [forward(inputs[i: i + batch_size]) for i in range(0, len(inputs), batch_size)]
        y = torch.tensor(labels)
        for j, off in enumerate(offsets):
            counts[j] = (torch.cat([o[j] for o in outs]).argmax(-1).cpu() == y + off).sum()
        counts[-1] = len(inputs)
    counts = dist.all_reduce_sum(counts)
    return [(counts[j] / counts[-1]).item() for j in range(len(offsets))]
