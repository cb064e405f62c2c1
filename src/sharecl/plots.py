"""Plots a person would rather look at than read (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["accuracy_heatmap"]


def accuracy_heatmap(R: list[list[float | None]], task_names: list[str], title: str, out: str | Path) -> Path:
    """Save the accuracy matrix as an annotated heatmap PNG (rows: after task i; columns: task j)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    M = np.array([[np.nan if v is None else 100 * v for v in row] for row in R], dtype=float)
    T = len(task_names)
    fig, ax = plt.subplots(figsize=(1.3 * T + 2.5, 1.0 * T + 1.8))
    im = ax.imshow(M, vmin=0, vmax=100, cmap="viridis")
    for i in range(T):
        for j in range(T):
            if not np.isnan(M[i, j]):
                ax.text(j, i, f"{M[i, j]:.1f}", ha="center", va="center", color="white" if M[i, j] < 60 else "black", fontsize=9)
    ax.set_xticks(range(T), task_names, rotation=35, ha="right")
    ax.set_yticks(range(T), [f"after {n}" for n in task_names])
    ax.set_xlabel("evaluated task")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
