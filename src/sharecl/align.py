"""Classifier alignment from stored class statistics (class-incremental learning).

Heads trained one task at a time never compete with each other's classes, so without a task id
their logits are not calibrated against one another. SLCA (Zhang et al., ICCV 2023, §3.3
"classifier alignment") and InfLoRA+CA keep, per class, the mean and covariance of its features
(no data), and after each task re-train the unified classifier on features sampled from every
seen class's Gaussian. sharecl offers that to every method whose class-incremental inference
reads one feature space for all tasks (``--align``; ``ContinualMethod.align_classifier``).

[ours] The covariance gets a ridge of ``ridge · trace(Σ)/hidden`` before its Cholesky factor
(a class has fewer training examples than feature dimensions, so Σ is singular); the heads are
trained with AdamW on cross-entropy over every seen class, a fresh sample each step. A full
covariance costs ``hidden²`` numbers per class; :func:`low_rank_statistics` keeps its top-R
eigenvectors plus the diagonal instead (``Σ ≈ F Fᵀ + diag(d)``, exact on the diagonal: the
factor-analysis form), and :func:`full_covariances` expands either form where Σ is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["class_statistics", "low_rank_statistics", "full_covariances", "sample_features", "align_heads", "pooled_gaussian",
           "max_class_log_likelihood"]


@torch.no_grad()
def class_statistics(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class feature mean and covariance, computed in float64.

    Args:
        features: ``(N, hidden)`` float features of a task's training examples.
        labels: ``(N,)`` int64 labels in ``[0, num_classes)``.

    Returns:
        ``means (C, hidden)`` and ``covs (C, hidden, hidden)`` (unbiased, symmetric), float32.

    Raises:
        ValueError: if a class has fewer than 2 examples (no covariance).
    """
    x = features.detach().to(torch.float64).cpu()
    y = labels.cpu()
    counts = torch.bincount(y, minlength=num_classes)
    if int(counts.min()) < 2:
        bad = int((counts < 2).nonzero()[0])
        raise ValueError(f"class {bad} has {int(counts[bad])} training example(s); class statistics need at least 2 per class")
    means = torch.stack([x[y == c].mean(0) for c in range(num_classes)])
    covs = torch.stack([torch.cov(x[y == c].T, correction=1).reshape(x.shape[1], x.shape[1]) for c in range(num_classes)])
    covs = (covs + covs.transpose(1, 2)) / 2
    return means.float(), covs.float()


@torch.no_grad()
def low_rank_statistics(means: torch.Tensor, covs: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep each class covariance as its top-``rank`` eigen-directions plus a diagonal [ours]:
    ``Σ_c ≈ F_c F_cᵀ + diag(d_c)`` with ``F_c = V_r diag(√λ_r)`` (the best rank-r part, Eckart–Young)
    and ``d_c = diag(Σ_c) − diag(F_c F_cᵀ) ≥ 0`` (the variance it misses, so every feature keeps its
    variance exactly). ``rank·hidden + 2·hidden`` numbers per class instead of ``hidden² + hidden``.

    Args:
        means: ``(C, hidden)``; covs: ``(C, hidden, hidden)`` from :func:`class_statistics`.
        rank: directions kept, ``1 ≤ rank ≤ hidden``.

    Returns:
        ``(means (C, h), factors (C, h, rank), diags (C, h))`` float32.

    Raises:
        ValueError: for a rank outside ``[1, hidden]``.
    """
    h = covs.shape[-1]
    if not 1 <= rank <= h:
        raise ValueError(f"covariance rank must be in [1, {h}] (the feature size), got {rank}")
    evals, evecs = torch.linalg.eigh(covs.to(torch.float64))  # ascending
    top = evals[:, -rank:].clamp_min(0.0)
    factors = evecs[:, :, -rank:] * top.sqrt()[:, None, :]
    diags = (covs.to(torch.float64).diagonal(dim1=-2, dim2=-1) - factors.pow(2).sum(-1)).clamp_min(0.0)
    return means.float(), factors.float(), diags.float()


def full_covariances(stats: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(means, covs)`` from either form of class statistics: ``(means, covs)`` as kept by
    :func:`class_statistics`, or ``(means, factors, diags)`` from :func:`low_rank_statistics`
    (expanded to ``F Fᵀ + diag(d)``, float32 ``(C, h, h)``)."""
    if len(stats) == 2:
        return stats[0], stats[1]
    means, factors, diags = stats
    return means, factors @ factors.transpose(1, 2) + torch.diag_embed(diags)


def _cholesky(covs: torch.Tensor, ridge: float) -> torch.Tensor:
    c = covs.to(torch.float64)
    h = c.shape[-1]
    scale = (c.diagonal(dim1=-2, dim2=-1).sum(-1) / h).clamp_min(1e-12)
    eye = torch.eye(h, dtype=torch.float64)
    return torch.linalg.cholesky(c + ridge * scale[:, None, None] * eye)


def sample_features(means: torch.Tensor, covs: torch.Tensor | None, per_class: int, generator: torch.Generator,
                    ridge: float = 1e-3, chol: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``per_class`` features from each class's Gaussian ``N(μ_c, Σ_c + ridge·tr(Σ_c)/h·I)``.

    Returns:
        ``z (C·per_class, hidden)`` float32 and labels ``(C·per_class,)`` int64 (class-major).
    """
    if chol is None and covs is None:
        raise ValueError("give the class covariances, or their Cholesky factors as chol")
    L = _cholesky(covs, ridge) if chol is None else chol  # type: ignore[arg-type]  # covs is given when chol is not
    C, h = means.shape
    eps = torch.randn(C, per_class, h, generator=generator, dtype=torch.float64)
    z = means.to(torch.float64)[:, None, :] + eps @ L.transpose(1, 2)
    return z.reshape(C * per_class, h).float(), torch.arange(C).repeat_interleave(per_class)


def align_heads(heads: Sequence[nn.Module], stats: Sequence[tuple[torch.Tensor, ...]], *, steps: int, per_class: int,
                lr: float, generator: torch.Generator, ridge: float = 1e-3) -> dict:
    """Re-train the concatenated heads on features sampled from every seen class's Gaussian.

    Args:
        heads: one linear head per task, in task order; class ``j`` of task ``t`` is global class
            ``sum(classes of earlier tasks) + j``.
        stats: per task ``(means (C_t, hidden), covs (C_t, hidden, hidden))`` from
            :func:`class_statistics` (or the low-rank form of :func:`low_rank_statistics`), in the same order.
        steps: AdamW steps; each draws ``per_class`` fresh features per class.
        lr: AdamW learning rate.

    Returns:
        ``{"loss_before", "loss_after"}``: cross-entropy on one fresh sample (nats).

    Raises:
        ValueError: if heads and statistics disagree in number or size.
    """
    if len(heads) != len(stats) or any(h.out_features != st[0].shape[0] for h, st in zip(heads, stats)):
        raise ValueError("align_heads needs one (means, covs) pair per head, with one row per class of that head")
    stats = [full_covariances(st) for st in stats]
    means = torch.cat([m for m, _ in stats])
    chol = torch.cat([_cholesky(c, ridge) for _, c in stats])
    device = next(heads[0].parameters()).device
    params = [p for h in heads for p in h.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def loss_on_sample() -> torch.Tensor:
        z, y = sample_features(means, None, per_class, generator, chol=chol)  # the Cholesky factors replace covs
        z, y = z.to(device), y.to(device)
        return nn.functional.cross_entropy(torch.cat([h(z) for h in heads], -1), y)

    with torch.no_grad():
        before = float(loss_on_sample())
    with torch.enable_grad():
        for _ in range(steps):
            loss = loss_on_sample()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        after = float(loss_on_sample())
    return {"loss_before": before, "loss_after": after}


def pooled_gaussian(means: torch.Tensor, covs: torch.Tensor, shrink: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One Gaussian per class with a shared covariance (LDA): the classes' mean covariance,
    shrunk towards ``trace/hidden · I`` by ``shrink`` [ours; the Mahalanobis score of Lee et al.
    2018 ties the covariance the same way].

    Returns:
        ``(means (C, h) float64, L (h, h) lower Cholesky factor of Σ, log det Σ)``.
    """
    m, c = means.to(torch.float64), covs.to(torch.float64).mean(0)
    h = c.shape[0]
    target = torch.eye(h, dtype=torch.float64) * (c.trace() / h).clamp_min(1e-12)
    chol = torch.linalg.cholesky((1 - shrink) * c + shrink * target)
    return m, chol, float(2 * chol.diagonal().log().sum())


def max_class_log_likelihood(z: torch.Tensor, gaussian: tuple[torch.Tensor, torch.Tensor, float]) -> torch.Tensor:
    """``max_c log N(z; μ_c, Σ) + h/2 · log 2π`` per row: ``−½ (z − μ_c)ᵀ Σ⁻¹ (z − μ_c) − ½ log det Σ``
    of the best class, ``(N,)`` float64, for features ``z`` ``(N, h)`` and a :func:`pooled_gaussian`."""
    means, chol, logdet = gaussian
    diff = z.detach().to(torch.float64).cpu()[:, None, :] - means[None]  # (N, C, h)
    sol = torch.linalg.solve_triangular(chol, diff.reshape(-1, diff.shape[-1]).T, upper=False)
    d2 = sol.pow(2).sum(0).reshape(z.shape[0], -1)
    return (-0.5 * d2 - 0.5 * logdet).max(-1).values
