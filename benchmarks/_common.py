"""Helpers shared by the benchmark scripts: a results folder, a table printer, JSON output."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# how tables and plots name the methods: each method's class declares its label (the registry is the one list)
def _labels() -> dict[str, str]:
    from sharecl.methods import METHODS
    from sharecl.methods.registry import method_label

    return {name: method_label(name) for name in METHODS}


METHOD_LABELS = _labels()


def pct_pm(stat: dict | None) -> str:
    """``"mean ± std"`` in % (two decimals) of a ``{"mean", "std"}`` of fractions; "—" when there is no mean."""
    return "—" if not stat or stat.get("mean") is None else f"{100 * stat['mean']:.2f} ± {100 * stat['std']:.2f}"


def environment() -> dict:
    """Library versions and the floating-point set-up the numbers depend on (:mod:`sharecl.provenance`)."""
    from sharecl.provenance import environment as fp_environment
    from sharecl.provenance import library_versions

    return {**library_versions(), **fp_environment()}


def write(name: str, payload: dict) -> Path:
    """Write ``results/<name>.json`` with the environment attached; returns the path."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=2))
    return path


def table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of ``rows`` restricted to ``columns``."""
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def wait_healthy(url: str, proc, timeout_s: float = 300.0, what: str = "server") -> None:
    """Poll ``url/health`` until it answers 200; raise if ``proc`` exits or ``timeout_s`` passes."""
    import time

    import httpx

    deadline = time.time() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.time() > deadline or proc.poll() is not None:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.5)
