"""Metrics over the accuracy matrix (pure functions; METHODS.md "Metrics").

``R[i][j]`` is the accuracy on task j's test set after learning task i, a fraction in
``[0, 1]``; entries for tasks not yet learned (``j > i``) are ``None``.
"""

from __future__ import annotations

import math

__all__ = ["final_average_accuracy", "average_incremental_accuracy", "forgetting", "backward_transfer", "forward_transfer",
           "summarize"]


def _check(R: list[list[float | None]]) -> int:
    T = len(R)
    if T == 0 or any(len(row) != T for row in R):
        raise ValueError("the accuracy matrix must be square, one row and one column per task")
    for i in range(T):
        for j in range(i + 1):
            v = R[i][j]
            if v is None or not 0.0 <= v <= 1.0:
                raise ValueError(f"R[{i}][{j}] = {R[i][j]!r} must be a fraction in [0, 1]")
    return T


def final_average_accuracy(R) -> float:
    """``A_T = mean_j R[T-1][j]``."""
    T = _check(R)
    return sum(R[T - 1]) / T


def average_incremental_accuracy(R) -> float:
    """``Ā = mean_i mean_{j≤i} R[i][j]``."""
    T = _check(R)
    return sum(sum(R[i][: i + 1]) / (i + 1) for i in range(T)) / T


def forgetting(R) -> float:
    """``F = mean_{j<T-1} (max_{i<T-1} R[i][j] − R[T-1][j])``; NaN for one task."""
    T = _check(R)
    if T < 2:
        return math.nan
    return sum(max(R[i][j] for i in range(j, T - 1)) - R[T - 1][j] for j in range(T - 1)) / (T - 1)


def backward_transfer(R) -> float:
    """``BWT = mean_{j<T-1} (R[T-1][j] − R[j][j])``; NaN for one task."""
    T = _check(R)
    if T < 2:
        return math.nan
    return sum(R[T - 1][j] - R[j][j] for j in range(T - 1)) / (T - 1)


def forward_transfer(R) -> float:
    """``FWT = mean_j R[j][j]``: each task's score right after it is learned, as the LLM
    continual-learning papers report it (SAPT, GainLoRA; METHODS.md §6)."""
    T = _check(R)
    return sum(R[j][j] for j in range(T)) / T


def summarize(R) -> dict[str, float | None]:
    """All four metrics, keyed as in ``results.json``.

    A matrix whose only filled row is the last (joint training, which is not continual) gets
    the final average accuracy and ``None`` for the metrics that need earlier rows.
    """
    if len(R) > 1 and all(all(v is None for v in row) for row in R[:-1]):
        if len(R[-1]) != len(R) or any(v is None or not 0.0 <= v <= 1.0 for v in R[-1]):
            raise ValueError("the final row must hold a fraction in [0, 1] for every task")
        return {"final_average_accuracy": sum(R[-1]) / len(R), "average_incremental_accuracy": None,
                "forgetting": None, "bwt": None}
    return {"final_average_accuracy": final_average_accuracy(R),
            "average_incremental_accuracy": average_incremental_accuracy(R),
            "forgetting": forgetting(R), "bwt": backward_transfer(R)}
