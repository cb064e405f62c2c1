"""Generation tasks: (prompt, target) pairs scored by exact match or ROUGE-L (METHODS.md §6).

A :class:`GenerationTask` holds fixed train and test splits of ``(prompt, target)`` string
pairs, the metric it is scored by and how many tokens an answer may take. Users' tasks come
from CSV or JSONL files with ``prompt`` / ``completion`` columns, or a ``messages`` column in
chat form (a user turn, then the assistant's answer), or a ``datasets`` directory written by
``save_to_disk``; :func:`load_generation_file` reads them with the ``datasets`` library.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from sharecl.data.files import DataFileError as GenerationDataError  # one error type for every data file
from sharecl.data.tasks import check_task_name
from sharecl.generation.scoring import METRICS
from sharecl.objectives import GENERATION

__all__ = ["GenerationTask", "split_pairs", "read_pairs", "load_generation_file", "is_generation_file", "GenerationDataError"]


@dataclass
class GenerationTask:
    """One generation task.

    Attributes:
        name: task name (:func:`sharecl.data.tasks.check_task_name`).
        train_inputs, test_inputs: ``(prompt, target)`` string pairs.
        metric: ``exact-match`` or ``rouge-l`` (:mod:`sharecl.generation.scoring`).
        max_new_tokens: the most tokens an answer may take at evaluation.
        meta: where the data came from, seed, sizes: recorded in run manifests.
        val_inputs: the validation split, ``(prompt, target)`` pairs (empty when the task has
            none); disjoint from train and test, never trained on: what ``compare --tune-lr``
            and other choices read instead of the test split.
    """

    name: str
    train_inputs: list[tuple[str, str]]
    test_inputs: list[tuple[str, str]]
    metric: str = "rouge-l"
    max_new_tokens: int = 32
    meta: dict = field(default_factory=dict)
    val_inputs: list[tuple[str, str]] = field(default_factory=list)
    objective = GENERATION  # target-token cross-entropy; generation scored by ``metric`` (sharecl.objectives)
    kind = "generation"
    classes: tuple = ()

    def __post_init__(self):
        check_task_name(self.name)
        if self.metric not in METRICS:
            raise ValueError(f"task {self.name!r}: metric must be one of {METRICS}, got {self.metric!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"task {self.name!r}: max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        if not self.train_inputs:
            raise ValueError(f"task {self.name!r} has no training examples")
        for split in (self.train_inputs, self.test_inputs, self.val_inputs):
            for ex in split:
                if not (isinstance(ex, tuple) and len(ex) == 2 and all(isinstance(s, str) for s in ex)):
                    raise ValueError(f"task {self.name!r}: an example must be a (prompt, target) pair of strings, got {ex!r:.80}")

    @property
    def train_labels(self) -> list:
        return []

    @property
    def num_classes(self) -> int:
        return 0

    def describe(self) -> dict:
        """JSON-ready summary: name, kind, metric, sizes, meta, and one training example."""
        return {"name": self.name, "kind": self.kind, "metric": self.metric, "max_new_tokens": self.max_new_tokens,
                "example": list(self.train_inputs[0]), **self.meta,  # the sizes held now, not those meta was drawn with
                "train_size": len(self.train_inputs), "test_size": len(self.test_inputs), "val_size": len(self.val_inputs)}


def split_pairs(name: str, pairs: list[tuple[str, str]], *, seed: int, train_size: int | None, test_size: int | None,
                test_fraction: float = 0.2, metric: str = "rouge-l", max_new_tokens: int = 32,
                meta: dict | None = None, val_size: int | None = None) -> GenerationTask:
    """A task from ``pairs`` with a seeded split; a prompt appearing twice is kept once (its first
    target), so no prompt is in two splits.

    The pairs are sorted, then shuffled with ``random.Random(f"{seed}:{name}")``: the split depends
    on nothing but the data and the seed. The first ``test_size`` go to test, the next
    ``train_size`` to train (without sizes a ``test_fraction`` is held out), and the next
    ``val_size`` (default None: no validation split) to validation, so adding a validation split
    changes neither train nor test (as :func:`sharecl.data.tasks.split_task`); with fewer left
    over, validation gets what there is. Without a ``train_size`` validation is carved from the
    front of what training would get.

    Raises:
        ValueError: if too few distinct prompts remain for a training split.
    """
    first: dict[str, str] = {}
    for p, t in pairs:
        first.setdefault(p, t)
    items = sorted(first.items())
    random.Random(f"{seed}:{name}").shuffle(items)
    n_test = test_size if test_size is not None else max(1, round(len(items) * test_fraction))
    test, rest = items[:n_test], items[n_test:]
    n_val = val_size or 0
    if train_size is not None:
        train, val = rest[:train_size], rest[train_size:train_size + n_val]
    else:
        val, train = rest[:n_val], rest[n_val:]
    if not train:
        raise ValueError(f"task {name!r}: {len(items)} distinct prompts leave none for training after {n_test} test "
                         f"and {len(val)} validation examples")
    info = {"seed": seed, "train_size": len(train), "test_size": len(test), **({"val_size": len(val)} if val_size else {}),
            **(meta or {})}
    return GenerationTask(name, train, test, metric, max_new_tokens, info, val)


def _chat_pair(messages, where: str) -> tuple[str, str]:
    if not isinstance(messages, list) or len(messages) < 2:
        raise GenerationDataError(f"{where}: 'messages' must be a list of at least a user and an assistant turn")
    try:
        users = [m["content"] for m in messages[:-1] if m["role"] == "user"]
        last = messages[-1]
        role, answer = last["role"], last["content"]
    except (KeyError, TypeError):
        raise GenerationDataError(f"{where}: each message needs 'role' and 'content'") from None
    if role != "assistant" or not users:
        raise GenerationDataError(f"{where}: the last message must be the assistant's answer, after a user turn")
    return "\n\n".join(str(u) for u in users), str(answer)


def read_pairs(path: str | Path, *, prompt_column: str = "prompt", completion_column: str = "completion") -> list[tuple[str, str]]:
    """``(prompt, target)`` pairs from a ``.csv``, ``.jsonl``/``.json`` file or a ``save_to_disk`` directory.

    Columns: ``prompt`` and ``completion`` (names configurable), or ``messages`` (chat form: the
    user turns, joined, form the prompt, the final assistant turn is the target).

    Raises:
        GenerationDataError: for a missing, empty or unreadable file, missing columns, or empty values.
    """
    from sharecl.data.files import open_table

    p = Path(path)
    ds = open_table(p, f"'{prompt_column}' and '{completion_column}' columns, or 'messages'")
    cols = ds.column_names
    out = []
    if prompt_column in cols and completion_column in cols:
        for i, row in enumerate(ds):
            pr, co = row[prompt_column], row[completion_column]
            if not isinstance(pr, str) or not isinstance(co, str) or not pr.strip() or not co.strip():
                raise GenerationDataError(f"{p} row {i + 1}: '{prompt_column}' and '{completion_column}' must be non-empty text")
            out.append((pr, co))
    elif "messages" in cols:
        out = [_chat_pair(row["messages"], f"{p} row {i + 1}") for i, row in enumerate(ds)]
    else:
        raise GenerationDataError(f"{p} needs '{prompt_column}' and '{completion_column}' columns, or 'messages'; it has {cols}")
    if not out:
        raise GenerationDataError(f"{p} has no rows")
    return out


def is_generation_file(path: str | Path, *, prompt_column: str = "prompt", completion_column: str = "completion") -> bool:
    """Whether a data file holds generation pairs (``prompt`` and ``completion`` columns, or
    ``messages``) rather than labelled texts. A file that cannot be read is not one (its
    reader says why).
    """
    from sharecl.data.files import open_table

    try:
        cols = open_table(Path(path), "").column_names
    except GenerationDataError:
        return False
    return (prompt_column in cols and completion_column in cols) or "messages" in cols


def load_generation_file(name: str, path: str | Path, *, seed: int = 0, test_fraction: float = 0.2, metric: str = "rouge-l",
                         max_new_tokens: int = 32, **columns) -> GenerationTask:
    """A :class:`GenerationTask` from one data file (:func:`read_pairs`), split by :func:`split_pairs`."""
    pairs = read_pairs(path, **columns)
    return split_pairs(name, pairs, seed=seed, train_size=None, test_size=None, test_fraction=test_fraction,
                       metric=metric, max_new_tokens=max_new_tokens, meta={"source": str(path)})
