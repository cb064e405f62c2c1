"""What a result depends on: library versions and the machine's floating-point set-up.

Runs with the same seed are bit-identical on one machine, but not across machines of the
same kind: the BLAS library (MKL on AMD vs Intel), ATen's CPU kernels (AVX2 vs AVX-512
dispatch) and the thread count change the order of floating-point sums. Every manifest
(stores, runs, comparisons) records :func:`environment` beside :func:`library_versions`.
"""

from __future__ import annotations

import os
import platform
import re

__all__ = ["library_versions", "environment", "REPRODUCIBILITY_VARIABLES", "REPRODUCIBLE_MODE", "reproducible_mode"]

#: Environment variables that change floating-point results, recorded when set.
REPRODUCIBILITY_VARIABLES = ("MKL_CBWR", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS",
                             "MKL_NUM_THREADS", "OPENBLAS_CORETYPE", "CUBLAS_WORKSPACE_CONFIG", "SHARECL_REPRODUCIBLE")

#: What ``sharecl --reproducible`` pins before torch loads: MKL's conditional numerical
#: reproducibility in its processor-independent code path, ATen's portable (not vectorised)
#: CPU kernels, and oneDNN's instruction set.
REPRODUCIBLE_MODE = {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}


def reproducible_mode() -> dict[str, str]:
    """Pin :data:`REPRODUCIBLE_MODE` in ``os.environ`` (values already set are kept) and mark it
    with ``SHARECL_REPRODUCIBLE=1``; returns what is in force.

    The variables are read when torch and MKL load, so this must run before ``import torch``.

    Raises:
        RuntimeError: if torch is already imported in this process.
    """
    import sys

    if "torch" in sys.modules:
        raise RuntimeError("reproducible mode must be set before torch is imported: pass --reproducible to sharecl, "
                           "or set MKL_CBWR=COMPATIBLE ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 in the environment")
    for k, v in REPRODUCIBLE_MODE.items():
        os.environ.setdefault(k, v)
    os.environ["SHARECL_REPRODUCIBLE"] = "1"
    return {k: os.environ[k] for k in REPRODUCIBLE_MODE}


def library_versions() -> dict[str, str]:
    """Versions of sharecl and the libraries its numbers depend on."""
    import peft
    import safetensors
    import torch
    import transformers

    import sharecl

    return {"sharecl": sharecl.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "safetensors": safetensors.__version__, "python": platform.python_version()}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """The machine's floating-point set-up, JSON-ready.

    Keys: ``cpu`` (model name), ``machine`` (e.g. x86_64), ``cpu_capability`` (ATen's kernel
    dispatch: DEFAULT, AVX2, AVX512), ``blas`` (the BLAS library torch uses, with its version),
    ``threads`` / ``interop_threads`` (torch's), ``variables`` (those of
    :data:`REPRODUCIBILITY_VARIABLES` that are set) and ``cuda`` (device name, or None).
    """
    import torch

    config = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=(\w+)", config)
    mkl = re.search(r"Math Kernel Library Version ([\w.\-]+)", config)
    name = blas.group(1) if blas else "unknown"
    return {
        "cpu": _cpu_model(), "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "blas": f"{name} {mkl.group(1)}" if name == "mkl" and mkl else name,
        "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
        "variables": {k: os.environ[k] for k in REPRODUCIBILITY_VARIABLES if k in os.environ},
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
