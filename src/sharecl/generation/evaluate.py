"""Evaluation of generation tasks: generate under a task's adapter, score against the targets."""

from __future__ import annotations

from sharecl import distributed as dist
from sharecl.generation.scoring import score

__all__ = ["generate_answers", "evaluate_generation"]


def generate_answers(method, task_name: str, prompts: list[str], *, max_new_tokens: int, batch_size: int = 32,
                     num_beams: int = 1) -> list[str]:
    """Answers of ``method``'s model to ``prompts`` under task ``task_name`` (``with method.task(...)``),
    greedy unless ``num_beams`` > 1, in batches of ``batch_size``.

    Raises:
        KeyError: for an unknown task; TypeError: if the method's backbone is not a causal LM.
    """
    from sharecl.generation.lm import CausalLM

    lm = method.encoder
    if not isinstance(lm, CausalLM):
        raise TypeError(f"generation needs a causal LM backbone; this method wraps a {type(lm).__name__}")
    out: list[str] = []
    with method.task(task_name):
        for i in range(0, len(prompts), batch_size):
            out += lm.generate(prompts[i: i + batch_size], max_new_tokens=max_new_tokens, num_beams=num_beams)
    return out


def evaluate_generation(method, task, batch_size: int = 32, *, num_beams: int = 1) -> tuple[float, list[str]]:
    """Mean score (fraction in [0, 1], the task's metric) over ``task``'s test pairs, and the answers.

    Under ``torchrun`` each rank answers its interleaved shard and the score sums are added, so
    every rank returns the mean over the whole split (its answers are its shard's).
    """
    import torch

    pairs = dist.shard(task.test_inputs)
    answers = generate_answers(method, task.name, [p for p, _ in pairs], max_new_tokens=task.max_new_tokens,
                               batch_size=batch_size, num_beams=num_beams)
    sums = torch.tensor([sum(score(task.metric, a, t) for a, (_, t) in zip(answers, pairs)), float(len(pairs))],
                        dtype=torch.float64)
    sums = dist.all_reduce_sum(sums)
    return (sums[0] / sums[1]).item() if sums[1] > 0 else float("nan"), answers
