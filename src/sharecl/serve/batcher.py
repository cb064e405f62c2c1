"""Mixed-task micro-batching: requests for any tasks that arrive together share one forward
(classification) or one ``generate`` call (generation)."""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["MicroBatcher"]


@dataclass
class _Pending:
    task: str | None  # None: no task id (classification: every task's classes compete)
    inputs: list
    option: object = None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


def _classify(method, inputs: list, tasks: list[str | None], options: list) -> list:
    """One logit vector per row: rows with a task as :meth:`mixed_logits` gives them, rows without
    one over every seen class (:meth:`cil_logits`, one more forward)."""
    out: list = [None] * len(inputs)
    for ids, run in (([i for i, t in enumerate(tasks) if t is not None], lambda xs, ts: method.mixed_logits(xs, ts)),
                     ([i for i, t in enumerate(tasks) if t is None], lambda xs, ts: method.cil_logits(xs))):
        if ids:
            for i, row in zip(ids, run([inputs[i] for i in ids], [tasks[i] for i in ids])):
                out[i] = row
    return out


def _probabilities(rows: list) -> torch.Tensor:
    return torch.stack(rows).float().softmax(-1).cpu()


def _generate(method, inputs: list, tasks: list[str], options: list) -> list:
    return method.mixed_generate(inputs, tasks, options)


#: What a batch runs, by kind: ``(run(method, inputs, tasks, options) -> one result per row,
#: finish(a request's rows) -> its answer)``.
KINDS: dict[str, tuple[Callable[..., list], Callable[[list], Any]]] = {"classify": (_classify, _probabilities),
                                                                      "generate": (_generate, list)}


class MicroBatcher:
    """Gathers requests for any tasks into mixed-task batches on one worker thread.

    Rows are gathered up to ``max_batch_size`` or ``max_wait_ms`` and run as **one** mixed-task
    forward (Share: each row gathers its task's ``M_t = C_B[t] C_A[t]ᵀ``, METHODS.md §1
    "Inference"; :meth:`~sharecl.methods.base.ContinualMethod.mixed_logits`), or for
    ``kind="generate"`` one greedy ``generate`` call in which every row decodes under its own
    task (:meth:`~sharecl.methods.base.ContinualMethod.mixed_generate`). A request is never
    split. When a batch fails, its requests are run again one by one, so only the request that
    causes the failure gets the exception and its neighbours get their answers.

    Args:
        snapshot: returns the :class:`~sharecl.serve.watcher.Loaded` version to run the next batch on.
        max_batch_size: rows per batch.
        max_wait_ms: how long a batch's first request waits for more rows.
        kind: ``classify`` or ``generate`` (:data:`KINDS`).

    :meth:`submit` returns a future resolving to ``(store_version, answer)``: probabilities
    ``(n, C)`` float32 (``classify``; ``task=None``: over every class the version has seen, in task
    order, from :meth:`~sharecl.methods.base.ContinualMethod.cil_logits`), or one list of new token ids per input (``generate``,
    whose ``option`` is the request's ``max_new_tokens``).
    """

    def __init__(self, snapshot, max_batch_size: int = 64, max_wait_ms: float = 5.0, kind: str = "classify"):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
        self.snapshot, self.max_batch_size, self.max_wait_s = snapshot, max_batch_size, max_wait_ms / 1000.0
        self._rows, self._finish = KINDS[kind]
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self.batches, self.rows, self.isolated = 0, 0, 0
        self._thread = threading.Thread(target=self._run, name="sharecl-micro-batcher", daemon=True)
        self._thread.start()

    def submit(self, task: str | None, inputs: list, option=None) -> concurrent.futures.Future:
        item = _Pending(task, list(inputs), option)
        self._queue.put(item)
        return item.future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _gather(self, first: _Pending) -> tuple[list[_Pending], _Pending | None, bool]:
        batch, rows, deadline = [first], len(first.inputs), time.perf_counter() + self.max_wait_s
        while rows < self.max_batch_size:
            left = deadline - time.perf_counter()
            try:
                item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, None, True
            if rows + len(item.inputs) > self.max_batch_size:
                return batch, item, False
            batch.append(item)
            rows += len(item.inputs)
        return batch, None, False

    def _run(self) -> None:
        carry = None
        while True:
            first = carry if carry is not None else self._queue.get()
            if first is None:
                return
            batch, carry, closing = self._gather(first)
            self._answer(batch, self.snapshot())
            if closing:
                return

    def _forward(self, batch: list[_Pending], loaded) -> list:
        inputs = [x for item in batch for x in item.inputs]
        tasks = [item.task for item in batch for _ in item.inputs]
        options = [item.option for item in batch for _ in item.inputs]
        with torch.inference_mode():
            rows = self._rows(loaded.method, inputs, tasks, options)
        self.batches += 1
        self.rows += len(inputs)
        out, pos = [], 0
        for item in batch:
            n = len(item.inputs)
            out.append(self._finish(rows[pos: pos + n]))
            pos += n
        return out

    def _answer(self, batch: list[_Pending], loaded) -> None:
        try:
            probs = self._forward(batch, loaded)
        except Exception as exc:  # noqa: BLE001 - find the request that fails; the others still get answers
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            self.isolated += 1
            for item in batch:
                self._answer([item], loaded)
            return
        for item, answer in zip(batch, probs):
            item.future.set_result((loaded.version, answer))
