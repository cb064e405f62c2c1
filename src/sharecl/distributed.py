"""Devices, precision and data parallelism on PyTorch's own engine (``torch.distributed``).

sharecl does not launch processes: ``torchrun`` (or ``accelerate launch``) does, and sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. When those
say more than one process, :func:`init_distributed` joins the process group (NCCL on CUDA,
gloo on CPU) and the rest of the library follows these rules:

- training wraps the trained parameters in ``DistributedDataParallel``; every rank takes
  an interleaved shard (``rank::world_size``, the order of
  ``torch.utils.data.DistributedSampler``) of the same global batch
  (:func:`sharecl.train.train_steps`);
- statistics that come from data are summed across ranks: the input covariances of
  InfLoRA and DualLoRA, evaluation counts, the training loss that is reported;
- data-free between-task work (Share's merge, SD-LoRA's fitting, GPM updates on reduced
  covariances) runs on every rank on identical inputs, so every rank holds the same state;
- only rank 0 (:func:`is_main`) writes files and prints.

Without a process group every helper here is the identity and sharecl is single-process.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = ["PRECISIONS", "native_bf16", "resolve_precision", "resolve_device", "init_distributed", "is_distributed", "rank",
           "world_size", "is_main",
           "RankAborted", "shard", "all_reduce_sum", "broadcast_object", "barrier", "shutdown", "main_rank_lock", "autocast"]

#: ``--precision`` choices: float32 everywhere, or bfloat16 autocast for the backbone's forward
#: (``"auto"`` resolves to one of them: :func:`resolve_precision`).
PRECISIONS = ("fp32", "bf16")


def native_bf16(device: str | torch.device | None = "cpu") -> bool:
    """Whether ``device`` computes bfloat16 matmuls natively: a CUDA GPU that supports bf16, or a
    CPU with AVX512-BF16 or AMX tiles (``torch.cpu``'s own checks)."""
    dev = torch.device(device or "cpu")
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if dev.type != "cpu":
        return False
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(bool(c()) for c in checks if c is not None)


def resolve_precision(precision: str, device: str | torch.device | None = "cpu", modality: str = "lm") -> str:
    """``fp32`` or ``bf16`` for ``--precision``: as given, or for ``"auto"`` bf16 autocast where a
    causal LM (``modality == "lm"``) runs on a device with native bfloat16 (:func:`native_bf16`),
    float32 otherwise. [ours] Encoders and ViTs stay float32 under ``auto``: they are small, and
    their published numbers were measured in float32; on SmolLM2-135M a CPU with AVX512-BF16 takes
    a training step about 1.5× faster in bf16 (issue 30's notes).

    Raises:
        ValueError: for anything but ``fp32``, ``bf16`` or ``auto``.
    """
    if precision == "auto":
        return "bf16" if modality == "lm" and native_bf16(device) else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of auto, {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch device for ``--device``.

    ``"auto"`` is CUDA when available (``cuda:LOCAL_RANK`` under torchrun), else CPU;
    ``"cuda"`` under torchrun likewise means this process's local GPU.

    Raises:
        ValueError: for an unknown spec, or CUDA asked for where there is none.
    """
    spec = "auto" if spec is None else str(spec)
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec}: this machine has no CUDA device (torch {torch.__version__}, "
                             f"cuda available: False); use --device cpu or auto")
        if spec == "cuda":
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        return torch.device(spec)
    raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}")


def init_distributed(device: torch.device, timeout_s: float | None = None) -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); returns whether one is active.

    The backend is NCCL for CUDA devices and gloo otherwise. A collective that waits longer than
    ``timeout_s`` (default: ``SHARECL_DIST_TIMEOUT`` seconds, else 600) raises instead of hanging,
    so a rank that dies makes the others fail rather than wait for ever.
    """
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    timeout_s = timeout_s or float(os.environ.get("SHARECL_DIST_TIMEOUT", "600"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes files and reports."""
    return rank() == 0


def shard(items: Sequence) -> Sequence:
    """This rank's interleaved share ``items[rank::world_size]`` (all of ``items`` when single-process)."""
    return items[rank()::world_size()] if is_distributed() else items


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over ranks, on ``t``'s device (in place when ``t`` already lives where
    the backend reduces: this rank's GPU under NCCL, the CPU under gloo); ``t`` when single-process."""
    if not is_distributed():
        return t
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    buf = t.to(dev)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s picklable ``obj`` on every rank (only sharecl's own small values travel this way)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (registered at exit by the command line)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def main_rank_lock(acquire):
    """Hold ``acquire()`` (a context manager, e.g. a store's write lock) on rank 0 only, for all ranks.

    Rank 0 tries to enter it; the outcome is broadcast, so when it fails (another writer holds
    the store) every rank raises the same error instead of waiting in a collective.
    """
    if not is_distributed():
        with acquire():
            yield
        return
    with contextlib.ExitStack() as stack:
        failure = None
        if is_main():
            try:
                stack.enter_context(acquire())
            except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
                failure = exc
        failed = broadcast_object(None if failure is None else (type(failure).__name__, str(failure)))
        if failure is not None:
            raise failure
        if failed is not None:
            raise RankAborted(f"rank 0 could not take the lock: {failed[0]}: {failed[1]}")
        yield


class RankAborted(RuntimeError):
    """Rank 0 failed and reported it; the other ranks stop with this (their message is rank 0's)."""


def autocast(device: torch.device, precision: str):
    """The autocast context for ``precision`` (``fp32``: disabled; ``bf16``: bfloat16 matmuls).

    Raises:
        ValueError: for a precision other than :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
