"""Users' own tasks from CSV / JSONL files or Hugging Face ``datasets`` saved to disk.

Files need a text column (``text``) and a label column (``label``, strings or ints). Loading
uses ``datasets`` (``load_dataset("csv"/"json", data_files=...)`` or ``load_from_disk``),
offline.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from sharecl.data.tasks import Task, split_task

__all__ = ["DataFileError", "open_table", "read_labelled_file", "load_task_file"]


class DataFileError(ValueError):
    """A data file that cannot be used, with the reason and the fix in the message."""


def open_table(p: Path, needs: str):
    """The rows of a ``.csv``, ``.jsonl``/``.json`` file or a ``save_to_disk`` directory as a
    ``datasets.Dataset`` (a DatasetDict's ``train`` split, else its first), read offline.

    Args:
        needs: the columns the caller needs, for the messages of empty files.

    Raises:
        DataFileError: for a missing, empty, unreadable or unsupported file.
    """
    import datasets

    if not p.exists():
        raise DataFileError(f"data file {p} does not exist")
    datasets.disable_progress_bars()
    try:
        if p.is_dir():
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        elif p.suffix.lower() == ".csv":
            if p.stat().st_size == 0:
                raise DataFileError(f"data file {p} is empty; it needs a header row with {needs}")
            with open(p, encoding="utf-8", errors="replace") as fh:
                if sum(1 for line in fh if line.strip()) < 2:
                    raise DataFileError(f"{p} has no rows below its header")
            ds = datasets.load_dataset("csv", data_files=str(p), split="train")
        elif p.suffix.lower() in (".jsonl", ".json"):
            if p.stat().st_size == 0:
                raise DataFileError(f"data file {p} is empty; it needs one JSON object per line with {needs}")
            ds = datasets.load_dataset("json", data_files=str(p), split="train")
        else:
            raise DataFileError(f"unsupported data file {p}: use .csv, .jsonl or a directory written by datasets' save_to_disk")
    except DataFileError:
        raise
    except Exception as exc:  # datasets raises many types for unreadable files
        raise DataFileError(f"cannot read {p}: {type(exc).__name__}: {exc}") from exc
    return ds


def read_labelled_file(path: str | Path, *, text_column: str = "text", label_column: str = "label") -> tuple[list[str], list[str]]:
    """Read ``(texts, labels)`` from a ``.csv``, ``.jsonl``/``.json`` file or a ``save_to_disk`` directory.

    Labels are returned as strings. Raises :class:`DataFileError` for a missing, empty or
    unreadable file, or missing columns.
    """
    p = Path(path)
    ds = open_table(p, f"'{text_column}' and '{label_column}'")
    missing = [c for c in (text_column, label_column) if c not in ds.column_names]
    if missing:
        raise DataFileError(f"{p} lacks column(s) {missing}; it has {ds.column_names}")
    if len(ds) == 0:
        raise DataFileError(f"{p} has no rows")
    texts, labels = ds[text_column], ds[label_column]
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise DataFileError(f"{p}: row {bad[0]} has an empty or non-text '{text_column}'")
    if any(lab is None for lab in labels):
        raise DataFileError(f"{p}: row {[i for i, lab in enumerate(labels) if lab is None][0]} has no '{label_column}'")
    return list(texts), [str(lab) for lab in labels]


def load_task_file(path: str | Path, name: str, *, seed: int = 0, test_fraction: float = 0.2,
                   classes: list[str] | None = None, text_column: str = "text", label_column: str = "label") -> Task:
    """A :class:`Task` from a labelled file, split per class with ``seed``.

    Args:
        classes: if given, the task's class list; a label outside it raises
            :class:`DataFileError` (used when a store already knows a task's classes).
    """
    texts, labels = read_labelled_file(path, text_column=text_column, label_column=label_column)
    if classes is not None:
        unknown = sorted(set(labels) - set(classes))
        if unknown:
            raise DataFileError(f"{path}: label {unknown[0]!r} is not one of the task's classes {classes}")
    by_class: dict[str, list[str]] = defaultdict(list)
    for t, lab in zip(texts, labels):
        by_class[lab].append(t)
    if len(by_class) < 2:
        raise DataFileError(f"{path}: found {len(by_class)} distinct label(s); a classification task needs at least 2")
    return split_task(name, dict(by_class), seed=seed, train_per_class=None, test_per_class=None,
                      test_fraction=test_fraction, meta={"source": str(path)})
