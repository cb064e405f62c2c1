"""Share's merge records (what each merge did: bases' sizes, kept energy, each old task's drift),
in the forms a long stream and a store keep them. Neutral ground: :mod:`sharecl.methods.share`
writes the records and :mod:`sharecl.store` stores them, and neither imports the other for it."""

from __future__ import annotations

__all__ = ["merge_summary", "compact_merges"]


def merge_summary(rec: dict) -> dict:
    """A merge record without its per-task drift: ``drift_mean``/``drift_max`` over old tasks and the ``worst_task``."""
    per = rec.get("per_task")
    summary = {k: v for k, v in rec.items() if k != "per_task"}
    if per:
        worst = max(per, key=lambda n: per[n]["max"])
        summary.update(drift_mean=sum(v["mean"] for v in per.values()) / len(per), drift_max=per[worst]["max"],
                       worst_task=worst)
    return summary


def compact_merges(merges: list[dict]) -> list[dict]:
    """Merge records as a checkpoint keeps them: every merge's summary (``k``, kept energy,
    ``drift_mean``/``drift_max`` over old tasks and the ``worst_task``), and the per-task drift of
    the last merge only, so they grow linearly with the number of tasks."""
    return [rec if i == len(merges) - 1 or rec.get("per_task") is None else merge_summary(rec) for i, rec in enumerate(merges)]
