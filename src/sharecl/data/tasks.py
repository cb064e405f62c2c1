"""Tasks and task streams.

A :class:`Task` is one classification problem: a name, its class names, and fixed train
and test splits (texts and integer labels), and optionally a validation split for choices
(learning rates, rules) that must not look at the test split. A :class:`Stream` is an ordered list of tasks
with the seed that drew their splits.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

from sharecl.objectives import CLASSIFICATION

if TYPE_CHECKING:
    from sharecl.generation.tasks import GenerationTask

#: a task of any objective: classification (:class:`Task`) or generation (``GenerationTask``)
TaskLike = Union["Task", "GenerationTask"]

__all__ = ["Task", "Stream", "split_task", "check_task_name", "validation_stream"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def check_task_name(name: str) -> str:
    """Return ``name`` if it is a valid task name, else raise ``ValueError`` saying why.

    Task names become file and module keys: letters, digits, ``_`` and ``-``, at most 64.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"invalid task name {name!r}: use 1-64 letters, digits, '_' or '-', starting with a letter or digit")
    return name


@dataclass
class Task:
    """One classification task.

    Attributes:
        name: task name (see :func:`check_task_name`).
        classes: class names; label ``i`` means ``classes[i]``.
        train_inputs, test_inputs: input texts, or uint8 image arrays ``(H, W[, C])``.
        train_labels, test_labels: ints in ``[0, len(classes))``.
        meta: where the data came from, the seed, caps: recorded in run manifests.
        val_inputs, val_labels: the validation split (empty when the task has none); disjoint
            from train and test, never trained on.
    """

    name: str
    classes: list[str]
    train_inputs: list
    train_labels: list[int]
    test_inputs: list
    test_labels: list[int]
    meta: dict = field(default_factory=dict)
    val_inputs: list = field(default_factory=list)
    val_labels: list[int] = field(default_factory=list)

    def __post_init__(self):
        check_task_name(self.name)
        if len(self.classes) < 2:
            raise ValueError(f"task {self.name!r} has {len(self.classes)} class(es); a classification task needs at least 2")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"task {self.name!r} has duplicate class names")
        for split, xs, ys in (("train", self.train_inputs, self.train_labels), ("test", self.test_inputs, self.test_labels),
                              ("validation", self.val_inputs, self.val_labels)):
            if len(xs) != len(ys):
                raise ValueError(f"task {self.name!r}: {len(xs)} {split} inputs but {len(ys)} labels")
            bad = [y for y in ys if not (isinstance(y, int) and 0 <= y < len(self.classes))]
            if bad:
                raise ValueError(f"task {self.name!r}: {split} label {bad[0]!r} is outside 0..{len(self.classes) - 1}")
        if not self.train_inputs:
            raise ValueError(f"task {self.name!r} has no training examples")

    #: what the task scores (:mod:`sharecl.objectives`): a head, cross-entropy, accuracy
    objective = CLASSIFICATION

    @property
    def kind(self) -> str:
        """``"classification"`` (the objective's kind)."""
        return self.objective.kind

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> dict:
        """JSON-ready summary: name, classes, sizes, meta."""
        return {"name": self.name, "classes": list(self.classes), "train_size": len(self.train_inputs),
                "test_size": len(self.test_inputs), "val_size": len(self.val_inputs), **self.meta}


@dataclass
class Stream:
    """An ordered sequence of tasks."""

    name: str
    tasks: Sequence[TaskLike]
    seed: int
    scenario: str = "til"
    modality: str = "text"  # "text", "image" or "lm" (generation tasks): which default backbone reads it
    image_size: int | None = None  # pixels per side the backbone sees (image streams)
    max_length: int | None = None  # tokens per example the stream needs (generation streams), else the run's

    def __post_init__(self):
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"stream {self.name!r} repeats a task name: {names}")

    def __iter__(self):
        return iter(self.tasks)

    def __len__(self):
        return len(self.tasks)


def split_task(name: str, examples: dict[str, list], *, seed: int, train_per_class: int | None,
               test_per_class: int | None, test_fraction: float = 0.2, meta: dict | None = None,
               val_per_class: int | None = None) -> Task:
    """Build a task from ``{class_name: [inputs]}`` with a seeded per-class split.

    Duplicate inputs are kept once, and inputs listed under two classes are dropped, so
    no test input is also a training input.

    Each class's examples are shuffled with ``random.Random(seed)`` (after sorting, so the
    result depends on nothing but the data and the seed). With caps, the first
    ``test_per_class`` go to test and the next ``train_per_class`` to train; without caps a
    ``test_fraction`` of each class is held out. Classes are sorted by name.

    ``val_per_class`` (default None: no validation split) validation examples per class come
    from what the caps leave over (the examples after the training ones), so adding a
    validation split changes neither train nor test; a class with fewer left over gives what
    it has. Without a training cap they are carved from the front of the training examples.
    """
    rng = random.Random(f"{seed}:{name}")
    classes = sorted(examples)
    owners: dict = {}
    for cls in classes:
        for x in set(examples[cls]):
            owners[x] = owners.get(x, 0) + 1
    tr_x, tr_y, te_x, te_y, va_x, va_y = [], [], [], [], [], []
    for label, cls in enumerate(classes):
        xs = sorted(x for x in set(examples[cls]) if owners[x] == 1)  # no duplicates, no ambiguous inputs
        rng.shuffle(xs)
        n_test = test_per_class if test_per_class is not None else max(1, round(len(xs) * test_fraction))
        test, rest = xs[:n_test], xs[n_test:]
        n_val = val_per_class or 0
        if train_per_class is not None:
            train, val = rest[:train_per_class], rest[train_per_class:train_per_class + n_val]
        else:
            val, train = rest[:n_val], rest[n_val:]
        te_x += test
        te_y += [label] * len(test)
        tr_x += train
        tr_y += [label] * len(train)
        va_x += val
        va_y += [label] * len(val)
    order = list(range(len(tr_x)))
    rng.shuffle(order)
    tr_x, tr_y = [tr_x[i] for i in order], [tr_y[i] for i in order]
    info = {"seed": seed, "train_per_class": train_per_class, "test_per_class": test_per_class,
            **({"val_per_class": val_per_class} if val_per_class else {}), **(meta or {})}
    return Task(name, classes, tr_x, tr_y, te_x, te_y, info, va_x, va_y)


def validation_stream(stream: Stream) -> Stream:
    """The same stream with every task's test split replaced by its validation split, for
    choices (learning rates, rules) that must not look at the test split.

    Raises:
        ValueError: if a task has no validation split (say which, and how to get one).
    """
    from dataclasses import replace

    missing = [t.name for t in stream if not getattr(t, "val_inputs", None)]
    if missing:
        raise ValueError(f"stream {stream.name!r}: tasks {missing[:4]} have no validation split; the packaged "
                         "streams have one (val_per_class, val_size), a data file needs one carved with val_per_class "
                         "(classification) or val_size (generation)")
    tasks = [replace(t, test_inputs=list(t.val_inputs), meta={**t.meta, "evaluated_on": "validation"},
                     **({"test_labels": list(t.val_labels)} if hasattr(t, "val_labels") else {}))
             for t in stream]
    return replace(stream, name=f"{stream.name}[validation]", tasks=tasks)
