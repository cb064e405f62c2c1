"""What a task scores: the one interface the training loop, the evaluation, the runner and the
shell ask (DESIGN.md, "objectives"). Methods know nothing of heads or metrics; a task names its
objective (``task.objective``) and the objective calls the method.

- :data:`CLASSIFICATION`: a head per task, cross-entropy over the task's classes, accuracy
  (class-incremental scoring is the method's ``cil_logits``).
- :data:`GENERATION`: a causal LM's token cross-entropy over the target tokens (prompt and
  padding masked, METHODS.md §6), greedy generation scored by the task's metric (exact match or
  ROUGE-L).

A training batch's loss comes back as ``(loss, count)``: with ``reduction="mean"`` the mean over
the batch's examples (classification) or target tokens (generation) and their number; with
``"sum"`` the sum, so that :func:`sharecl.train.train_steps` can weight shards by their counts
under ``torchrun``.
"""

from __future__ import annotations

__all__ = ["Objective", "ClassificationObjective", "GenerationObjective", "CLASSIFICATION", "GENERATION", "objective_of"]


class Objective:
    """The interface: ``kind``, :meth:`batch_loss`, :meth:`score`, :meth:`metric`. (torch is imported
    on first use: a task module can name its objective without loading torch.)"""

    kind = ""

    def metric(self, task) -> str:
        """What :meth:`score` measures for ``task`` (``accuracy``, ``exact-match``, ``rouge-l``)."""
        raise NotImplementedError

    def batch_loss(self, method, task, inputs: list, labels, reduction: str = "mean") -> tuple:
        """``(loss, count)`` of one training batch under ``task``'s trainable state: 0-dim float32
        loss (``reduction`` ``"mean"`` or ``"sum"``) and the 0-dim number of terms it averages or sums."""
        raise NotImplementedError

    def score(self, method, task, batch_size: int, samples: dict | None = None) -> float:
        """The task's score on its test split (a fraction in [0, 1]), with the task id."""
        raise NotImplementedError


class ClassificationObjective(Objective):
    """A head per task and cross-entropy over its classes; accuracy."""

    kind = "classification"

    def metric(self, task) -> str:
        return "accuracy"

    def batch_loss(self, method, task, inputs, labels, reduction="mean"):
        import torch
        from torch.nn import functional as F

        logits = method.logits(inputs, task.name, training=True)
        return F.cross_entropy(logits, labels, reduction=reduction), torch.tensor(float(len(inputs)))

    def score(self, method, task, batch_size, samples=None):
        from sharecl.train import evaluate

        return evaluate(lambda xs, n=task.name: method.logits(xs, n), task, batch_size)


class GenerationObjective(Objective):
    """The causal LM's target-token cross-entropy; greedy answers scored by ``task.metric``."""

    kind = "generation"

    def metric(self, task) -> str:
        return task.metric

    def batch_loss(self, method, task, inputs, labels, reduction="mean"):
        return method.lm_loss_terms(inputs, task.name, training=True, reduction=reduction)

    def score(self, method, task, batch_size, samples=None):
        from sharecl.generation.evaluate import evaluate_generation

        value, answers = evaluate_generation(method, task, batch_size)
        if samples is not None:  # the first answers, kept in a run's results
            samples[task.name] = [{"prompt": p, "target": t, "answer": a} for (p, t), a in zip(task.test_inputs[:3], answers)]
        return value


CLASSIFICATION = ClassificationObjective()
GENERATION = GenerationObjective()


def objective_of(task) -> Objective:
    """The objective a task declares (``task.objective``); classification for anything that does not."""
    return getattr(task, "objective", None) or CLASSIFICATION
