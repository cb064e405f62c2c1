"""Layer maths, one module per method: wrappers around one ``nn.Linear``."""

from sharecl.adapters.share import ShareLinear

__all__ = ["ShareLinear"]
