"""sharecl: continual, parameter-efficient fine-tuning of pretrained transformers.

The flagship method is Share (shared LoRA subspaces, arXiv 2602.06043); the LoRA baselines
run on real PEFT adapters. Importing this package has no side effects and does not import
torch: the names below load their module on first use (so ``sharecl --reproducible`` can pin
the floating-point environment before torch starts).
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "Encoder": "sharecl.backbone", "TaskHeads": "sharecl.backbone", "load_encoder": "sharecl.backbone",
    "Stream": "sharecl.data", "Task": "sharecl.data", "get_stream": "sharecl.data", "load_task_file": "sharecl.data",
    "METHODS": "sharecl.methods", "LoRAConfig": "sharecl.methods", "ShareConfig": "sharecl.methods",
    "ShareMethod": "sharecl.methods", "build_method": "sharecl.methods", "TrainConfig": "sharecl.train",
    "InfLoRAConfig": "sharecl.methods", "SDLoRAConfig": "sharecl.methods", "DualLoRAConfig": "sharecl.methods",
    "wrap": "sharecl.wrapping", "ContinualModel": "sharecl.wrapping", "from_pretrained": "sharecl.wrapping",
    "CausalLM": "sharecl.generation.lm", "load_causal_lm": "sharecl.generation.lm",
    "GenerationTask": "sharecl.generation.tasks", "load_generation_file": "sharecl.generation.tasks",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sharecl' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
