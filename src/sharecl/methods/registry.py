"""The registry of continual methods: :data:`METHODS`, filled by the :func:`register` decorator on
each method's class, and what reads it (``--methods all``, labels, capabilities, construction)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sharecl.backbone import Encoder
    from sharecl.methods.base import ContinualMethod

__all__ = ["METHODS", "register", "methods_where", "all_methods", "method_label", "build_method"]

METHODS: dict[str, type[ContinualMethod]] = {}


def register(cls: type[ContinualMethod]) -> type[ContinualMethod]:
    """Class decorator adding a method to :data:`METHODS` under ``cls.name``: the only list of
    methods; what a method offers (stores, ``--methods all``, labels, adapters, export, scenarios,
    task kinds) is declared on its class and read from here (:func:`methods_where`)."""
    METHODS[cls.name] = cls
    return cls


def methods_where(**flags) -> list[str]:
    """Registered method names whose class attributes equal ``flags`` (e.g. ``storable=True``),
    in registration order."""
    return [n for n, c in METHODS.items() if all(getattr(c, k) == v for k, v in flags.items())]


def all_methods(kind: str | None = None) -> list[str]:
    """What ``--methods all`` runs, in :attr:`ContinualMethod.all_order`; only those learning
    ``kind`` tasks (``classification`` or ``generation``) when given."""
    order = {n: c.all_order for n, c in METHODS.items() if c.all_order is not None}
    names = sorted(order, key=order.__getitem__)
    return [n for n in names if kind is None or kind in METHODS[n].task_kinds]


def method_label(name: str) -> str:
    """How tables and plots name a registered method (its class's :attr:`~ContinualMethod.label`)."""
    cls = METHODS.get(name)
    return (cls.label if cls is not None else "") or name


def build_method(name: str, encoder: Encoder, seed: int = 0, **config) -> ContinualMethod:
    """Instantiate a registered method.

    Raises:
        KeyError: for an unknown name (the message lists the known ones).
        ValueError: for an option the method's config does not have.
    """
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; known methods: {sorted(METHODS)}")
    try:
        return METHODS[name](encoder, seed=seed, **config)
    except TypeError as exc:
        if "unexpected keyword argument" not in str(exc):
            raise
        raise ValueError(f"method {name!r}: {exc}; valid options are the fields of its config class") from exc
