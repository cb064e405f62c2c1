"""Continual-learning methods, one module each, registered by name in :data:`METHODS`."""

from sharecl.methods.base import ContinualMethod, UnsupportedScenarioError
from sharecl.methods.duallora import DualLoRAConfig, DualLoRAMethod
from sharecl.methods.inflora import InfLoRAConfig, InfLoRAMethod
from sharecl.methods.lora import JointLoRAMethod, LoRAConfig, LoRAPerTaskMethod, SeqLoRAMethod
from sharecl.methods.probe import HeadOnlyMethod, ZeroShotMethod
from sharecl.methods.registry import METHODS, build_method
from sharecl.methods.sdlora import SDLoRAConfig, SDLoRAKDMethod, SDLoRAMethod, SDLoRARRMethod
from sharecl.methods.share import ShareConfig, ShareMethod
from sharecl.methods.share_full import ShareFullConfig, ShareFullMethod

__all__ = ["METHODS", "ContinualMethod", "UnsupportedScenarioError", "build_method", "ShareConfig", "ShareMethod",
           "LoRAConfig", "LoRAPerTaskMethod", "SeqLoRAMethod", "JointLoRAMethod", "HeadOnlyMethod", "ZeroShotMethod",
           "InfLoRAConfig", "InfLoRAMethod", "SDLoRAConfig", "SDLoRAMethod", "SDLoRARRMethod", "SDLoRAKDMethod",
           "DualLoRAConfig", "DualLoRAMethod", "ShareFullConfig", "ShareFullMethod"]
