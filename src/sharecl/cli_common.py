"""What every ``sharecl`` command shares: the console, torch set-up, and the option types.

Kept apart from :mod:`sharecl.cli` (stream commands) and :mod:`sharecl.cli_store` (store
commands) so both can use them; importing it loads no torch.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console

console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)


def setup_torch(threads: Optional[int], device: str = "cpu") -> str:
    """Quiet library noise, set threads, resolve ``--device`` and join torchrun's process group
    when there is one (rank ≠ 0 prints nothing). Returns the device, e.g. ``cpu`` or ``cuda:1``."""
    import atexit
    import warnings

    import torch

    from sharecl import distributed as dist

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")  # library deprecation noise
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads:
        torch.set_num_threads(threads)
    dev = dist.resolve_device(device)
    if dist.init_distributed(dev):
        atexit.register(dist.shutdown)
        console.quiet = not dist.is_main()
    return str(dev)


def share_options(k: Optional[int], p: Optional[int], energy: Optional[float], rank: int, phi: Optional[int], init: str,
                  finetune: int) -> dict:
    """ShareConfig overrides from the command line: a fixed k unless --energy is given; an option
    left out (None) is not passed, so the backbone family's default applies
    (:data:`sharecl.methods.share.SHARE_DEFAULTS`)."""
    opts = {"k": None if energy is not None else k, "energy": energy, "p": p, "r": rank, "phi": phi, "init": init,
            "merge_finetune_steps": finetune}
    return {key: v for key, v in opts.items() if v is not None}


def takes_share_options(method: str) -> bool:
    """Whether ``method``'s config is Share's (Share, Share-full), so ``--k``, ``--p``, ``--phi`` …
    apply to it (read from the registry; imports the methods late)."""
    from sharecl.methods import METHODS
    from sharecl.methods.share import ShareConfig

    cls = METHODS.get(method)
    return cls is not None and cls.config_class is not None and issubclass(cls.config_class, ShareConfig)


def _config_has(method: str, field: str) -> bool:
    """Whether ``method``'s config dataclass has ``field`` (read from the registry; imports the methods late)."""
    import dataclasses

    from sharecl.methods import METHODS

    cfg = METHODS[method].config_class
    return cfg is not None and field in {f.name for f in dataclasses.fields(cfg)}


def rank_options(method: str, rank: int) -> dict:
    """``{"r": rank}`` for a method whose config has a rank, else ``{}`` (head-only, zero-shot)."""
    return {"r": rank} if _config_has(method, "r") else {}


def target_options(method: str, targets: str | None) -> dict:
    """``{"target_modules": …}`` for a method whose config has targets, from ``--target-modules``:
    ``"all-linear"`` (PEFT's spelling) or comma-separated module names; ``{}`` when not given."""
    if not targets:
        return {}
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if not names:
        raise ValueError(f"--target-modules {targets!r}: give 'all-linear' or comma-separated module names, e.g. q_proj,v_proj")
    if not _config_has(method, "target_modules"):
        return {}
    return {"target_modules": "all-linear" if names == ["all-linear"] else names}


def default_lr(modality: str) -> float:
    """The learning rate by modality (:data:`sharecl.train.DEFAULT_LR`; imported late: torch loads slowly)."""
    from sharecl.train import DEFAULT_LR

    return DEFAULT_LR[modality]

KOpt = Annotated[Optional[int], typer.Option(help="Share: basis size k per side (ignored with --energy; default: the backbone "
                                                  "family's, 10 for encoders).")]
POpt = Annotated[Optional[int], typer.Option(help="Share: pseudo-rank p, columns of each task's coefficients (default: the "
                                                  "backbone family's, 2 for encoders).")]
EOpt = Annotated[Optional[float], typer.Option(help="Share: choose k by kept energy fraction instead of a fixed k.")]
PhiOpt = Annotated[Optional[int], typer.Option(help="Share: temporary directions per side while a task trains (φ; default: the "
                                                      "backbone family's, 2 for encoders).")]
InitOpt = Annotated[str, typer.Option(help="Share: coefficient init, 'zero' (ΔW = 0), 'previous' (warm start) or 'top' (ΔW = 0, "
                                           "A starting as the top-p basis directions).")]
FtOpt = Annotated[int, typer.Option(help="Share: steps fine-tuning the new task's coefficients after the merge.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N (under torchrun, cuda is each rank's LOCAL_RANK GPU).")]
PrecisionOpt = Annotated[str, typer.Option(help="auto (bf16 for a causal LM on a CPU or GPU with native bfloat16, else fp32), "
                                                 "fp32, or bf16 (bfloat16 autocast of the backbone; weights stay float32).")]
WarmupOpt = Annotated[int, typer.Option(help="Linear learning-rate warm-up over the first N steps of each task (0: none).")]
ClipOpt = Annotated[Optional[float], typer.Option(help="Clip the gradient norm of the trained parameters to this value.")]
AugmentOpt = Annotated[bool, typer.Option(help="Images: train on random resized crops (area 25-100 %) and horizontal flips.")]
OptimizerOpt = Annotated[str, typer.Option(help="adamw (every method alike) or sgd (momentum 0.9; SD-LoRA's official code).")]
AlignOpt = Annotated[bool, typer.Option(help="Class-incremental streams: keep each class's feature mean and covariance and, after "
                                             "every task, re-train all heads on features sampled from them (SLCA's classifier "
                                             "alignment; Share aligns task-identification heads on the base model's features instead).")]
AlignRankOpt = Annotated[Optional[int], typer.Option(help="With --align: keep each class covariance as its top-R eigenvectors plus "
                                                          "a diagonal (R·hidden + 2·hidden numbers, not hidden²); default: full.")]


def check_align_rank(align: bool, rank: Optional[int]) -> None:
    """``--align-rank`` needs ``--align`` and a positive rank (checked before any training)."""
    if rank is not None and not align:
        raise ValueError("--align-rank sets how --align keeps class covariances; pass --align too")
    if rank is not None and rank < 1:
        raise ValueError(f"--align-rank must be a positive number of directions, got {rank}")
