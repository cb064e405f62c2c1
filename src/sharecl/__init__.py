"""sharecl: continual, parameter-efficient fine-tuning of pretrained transformers.

The flagship method is Share (shared LoRA subspaces, arXiv 2602.06043); the LoRA baselines
run on real PEFT adapters. Importing this package has no side effects.
"""

from sharecl.backbone import Encoder, TaskHeads, load_encoder
from sharecl.data import Stream, Task, get_stream, load_task_file
from sharecl.methods import METHODS, LoRAConfig, ShareConfig, ShareMethod, build_method
from sharecl.train import TrainConfig

__version__ = "0.1.0"

__all__ = ["Encoder", "TaskHeads", "load_encoder", "Stream", "Task", "get_stream", "load_task_file", "METHODS",
           "LoRAConfig", "ShareConfig", "ShareMethod", "build_method", "TrainConfig", "__version__"]
