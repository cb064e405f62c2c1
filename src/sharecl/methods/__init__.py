"""Continual-learning methods, one module each, registered by name in :data:`METHODS`."""

from sharecl.methods.base import METHODS, ContinualMethod, UnsupportedScenarioError, build_method
from sharecl.methods.lora import LoRAConfig, LoRAPerTaskMethod, SeqLoRAMethod
from sharecl.methods.probe import HeadOnlyMethod
from sharecl.methods.share import ShareConfig, ShareMethod

__all__ = ["METHODS", "ContinualMethod", "UnsupportedScenarioError", "build_method", "ShareConfig", "ShareMethod",
           "LoRAConfig", "LoRAPerTaskMethod", "SeqLoRAMethod", "HeadOnlyMethod"]
