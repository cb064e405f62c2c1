"""``sharecl.wrap``: continual learning on a Hugging Face model the user has already loaded,
trained with the user's own loop or ``transformers.Trainer``.

```python
model = AutoModelForCausalLM.from_pretrained(path)
cl = sharecl.wrap(model, ShareConfig(k=32, p=4))
params = cl.begin_task("headlines")        # the tensors to train; everything else is frozen
...                                        # train model(**batch).loss with any optimiser / Trainer
cl.end_task()                              # Share's merge, InfLoRA's memory update, SD-LoRA's freeze, …
with cl.task("headlines"):
    out = model.generate(**inputs)
```

The method's layers replace the model's target linear layers in place (PEFT-style), so
``model`` itself is what the user trains and calls. A task's routing is the ``cl.task(name)``
context (:mod:`sharecl.routing`): per thread, restored on exit. Methods that design their
adapter from the task's inputs (InfLoRA, DualLoRA) need ``data``: an iterable of model-input
batches (dicts with ``input_ids`` / ``attention_mask``, as a ``DataLoader`` yields), read once at
``begin_task`` and once at ``end_task`` without gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["ContinualModel", "wrap", "from_pretrained", "method_for_config"]


class _ModelBackbone:
    """The little a method needs from a user's model: the module, its device and hidden size,
    and a forward on batches the user already tokenised; for a store, the base model's directory
    (``config._name_or_path``) and, for a causal LM, its tokenizer's identity."""

    images = None
    image_size = None
    precision = "fp32"

    def __init__(self, model: nn.Module, modality: str, max_length: int | None = None):
        self.model = model
        self.modality = modality
        self.path = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
        p = next(iter(model.parameters()), None)
        self.device = p.device if p is not None else torch.device("cpu")
        cfg = getattr(model, "config", None)
        self.hidden_size = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "d_model", 0) or 1)
        self.max_length = max_length or (256 if modality == "lm" else 128)
        self._tokenizer = None

    def _base_tokenizer(self):
        from transformers import AutoTokenizer

        if self._tokenizer is None:
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            except (OSError, ValueError) as exc:
                raise ValueError(f"a causal-LM store records the base model's tokenizer, and {self.path} has none it can read "
                                 f"({exc}); save it beside the weights: tokenizer.save_pretrained({self.path!r})") from exc
        return self._tokenizer

    @property
    def chat(self) -> bool:
        """Whether the base model's tokenizer has a chat template (prompts are formatted with it)."""
        return bool(getattr(self._base_tokenizer(), "chat_template", None))

    def identity(self) -> dict:
        """The tokenizer identity a causal-LM store records (:func:`sharecl.generation.lm.tokenizer_identity`)."""
        from sharecl.generation.lm import tokenizer_identity

        return tokenizer_identity(self._base_tokenizer(), self.chat)

    def tokenize(self, items: list) -> dict:
        if len(items) != 1 or not isinstance(items[0], Mapping):
            raise TypeError("data for a wrapped model must be an iterable of model-input dicts (a DataLoader's batches)")
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in items[0].items()}

    def encode(self, batch: dict) -> torch.Tensor:
        keep = {k: v for k, v in batch.items() if k != "labels"}
        self.model(**keep)
        return torch.zeros(1, self.hidden_size)


class _UserTask:
    """A task known only by its name (and optionally its input batches)."""

    kind = "user"
    classes: tuple = ()
    num_classes = 0
    train_labels: list = []

    def __init__(self, name: str, batches: list):
        from sharecl.data.tasks import check_task_name

        self.name = check_task_name(name)
        self.train_inputs = batches


def method_for_config(config) -> str:
    """The registered method a config object builds: its class's method (LoRAConfig: ``lora-per-task``;
    an SDLoRAConfig with ``rr`` / ``kd`` set: ``sd-lora-rr`` / ``sd-lora-kd``).

    Raises:
        TypeError: if no method takes this config class.
    """
    from sharecl.methods import METHODS

    names = [n for n, cls in METHODS.items() if cls.config_class is type(config)]
    if not names:
        raise TypeError(f"no sharecl method takes a {type(config).__name__}; use one of "
                        f"{sorted({c.config_class.__name__ for c in METHODS.values() if c.config_class})}")
    if "sd-lora" in names:
        return "sd-lora-kd" if getattr(config, "kd", False) else "sd-lora-rr" if getattr(config, "rr", False) else "sd-lora"
    return "lora-per-task" if "lora-per-task" in names else names[0]


class ContinualModel:
    """A continual method wrapped around a user's model (see the module docstring).

    Attributes:
        model: the user's model, its target layers replaced in place.
        method: the :class:`~sharecl.methods.base.ContinualMethod` doing the work.
    """

    def __init__(self, model: nn.Module, method):
        self.model = model
        self.method = method
        self._current: _UserTask | None = None
        self._groups: list[dict] = []

    @property
    def tasks(self) -> list[str]:
        """Names of the tasks learned (and being learned), in order."""
        return list(self.method.task_names)

    def begin_task(self, name: str, data: Iterable[Mapping] | None = None, *, lr: float = 1e-3) -> list[nn.Parameter]:
        """Start learning task ``name``; returns the parameters to train (adapter only: the user's
        loop owns the loss). ``lr`` is the base rate of :meth:`param_groups`: build the optimiser
        from those groups to train each group at the method's rate (Share's coefficients at
        ``coeff_lr_ratio × lr``); an optimiser built from this flat list trains all at one rate.

        Raises:
            RuntimeError: if a task is already open (call :meth:`end_task` first).
            ValueError: for a bad or existing name, or missing ``data`` for InfLoRA / DualLoRA.
        """
        from sharecl.train import TrainConfig

        if self._current is not None:
            raise RuntimeError(f"task {self._current.name!r} is still being learned; call end_task() first")
        batches = list(data) if data is not None else []
        if getattr(self.method, "needs_data", False) and not batches:
            raise ValueError(f"{self.method.name} designs its adapter from the task's inputs: pass data=<iterable of batches>")
        task = _UserTask(name, batches)
        groups = self.method.begin_task(task, TrainConfig(lr=lr, head_lr=lr, eval_batch_size=1))
        self._current = task
        self._groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
        self._groups = [g for g in self._groups if g["params"]]
        return list({id(p): p for g in self._groups for p in g["params"]}.values())

    def param_groups(self) -> list[dict]:
        """The open task's optimiser parameter groups, ``[{"params": [...], "lr": float, ...}]``,
        each at the rate the method trains it with (the ``lr`` given to :meth:`begin_task` times
        the group's ratio: Share's coefficients ``coeff_lr_ratio``, its new directions
        ``phi_lr_ratio``; METHODS.md §1): ``torch.optim.AdamW(cl.param_groups())``.

        Raises:
            RuntimeError: if no task is open.
        """
        if self._current is None:
            raise RuntimeError("no task is being learned; call begin_task(name) first")
        return [dict(g) for g in self._groups]

    def end_task(self) -> dict:
        """Finish the open task (the method's between-task work); returns its JSON-ready info.

        Raises:
            RuntimeError: if no task is open.
        """
        if self._current is None:
            raise RuntimeError("no task is being learned; call begin_task(name) first")
        from sharecl.train import TrainConfig

        task, self._current = self._current, None
        with torch.no_grad():
            return self.method.end_task(task, TrainConfig(lr=1e-3, eval_batch_size=1), progress=False)

    def task(self, name: str) -> contextlib.AbstractContextManager:
        """``with cl.task(name): model(...)`` / ``model.generate(...)`` computes for task ``name``.

        Raises:
            KeyError: for an unknown task.
        """
        return self.method.task(name)

    def mixed(self, names: list[str]) -> contextlib.AbstractContextManager:
        """``with cl.mixed(["a", "b", "a"]): model(**batch)`` computes row ``i`` of the batch for task
        ``names[i]`` in **one** forward (Share gathers each row's coefficients, METHODS.md §1;
        methods whose tasks share merged weights need no routing).

        Raises:
            KeyError: for an unknown task; ValueError: for a method that answers a mixed batch only
                one task at a time (DualLoRA: use ``cl.method.mixed_generate`` or ``mixed_logits``).
        """
        route = self.method.mixed_route(list(names))
        if route is None:
            raise ValueError(f"{self.method.name} computes a batch for one task at a time; group the rows by task "
                             "(with cl.task(name)), or use cl.method.mixed_generate / mixed_logits")
        return route

    def save_pretrained(self, path: str | Path) -> dict:
        """Write the learned tasks as the next version of a store at ``path`` (atomic, versioned:
        :func:`sharecl.store.save_store`), usable by ``sharecl generate/predict/serve/export`` and
        :func:`from_pretrained`. Returns the store's manifest.

        The store names its base model by directory and weights' sha256: the wrapped model must
        have been loaded from a local directory (``config._name_or_path``) holding its weights (and,
        for a causal LM, its tokenizer).

        Raises:
            RuntimeError: while a task is still open; ValueError: a base model without a local
                directory; StoreError: a method without a store format, or a store of another
                method or base model at ``path``.
        """
        from sharecl.store import save_store

        if self._current is not None:
            raise RuntimeError(f"task {self._current.name!r} is still being learned; call end_task() before saving")
        base = Path(self.method.encoder.path) if self.method.encoder.path else None
        if base is None or not base.is_dir() or not any(base.glob("*.safetensors")) and not any(base.glob("*.bin")):
            raise ValueError(f"a store names its base model by a local directory holding the weights, and this model was loaded "
                             f"from {str(base or '') or 'memory'!r}; save it first (model.save_pretrained(dir), and the "
                             f"tokenizer beside it) and wrap the model loaded from that directory")
        return save_store(self.method, path)


def from_pretrained(path: str | Path, model: nn.Module | None = None, *, device: str = "cpu", precision: str = "fp32") -> ContinualModel:
    """A store as a :class:`ContinualModel`: every task routable with ``cl.task(name)``, ready to
    learn more and :meth:`~ContinualModel.save_pretrained` again.

    Args:
        path: a store directory (``save_pretrained``, ``sharecl learn``, ``save_store``).
        model: the store's base model, already loaded by the user (it is wrapped in place);
            checked against the store by its directory's weights sha256. None: load it from the
            manifest's path (:func:`sharecl.store.load_store`).
        device, precision: where and how a model loaded here runs (ignored with ``model``).

    Raises:
        StoreError: a damaged store, or a ``model`` that is not the store's base model.
    """
    from sharecl.backbone import weights_hash
    from sharecl.store import StoreError, load_store, read_manifest, restore

    if model is None:
        method = load_store(path, device=device, precision=precision)
        return ContinualModel(method.encoder.model, method)
    manifest = read_manifest(path)
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    try:
        same = bool(name) and weights_hash(name) == manifest["base_model"]["sha256"]
    except (FileNotFoundError, OSError):
        same = False
    if not same:
        raise StoreError(f"the model passed was loaded from {name or 'memory'!r}, whose weights are not the base model of {path} "
                         f"({manifest['base_model']['path']}, sha256 {manifest['base_model']['sha256'][:12]}…); pass that model, "
                         f"or model=None to load it")
    for p in model.parameters():
        p.requires_grad_(False)
    backbone = _ModelBackbone(model, manifest.get("modality") or "text", manifest.get("max_length"))
    return ContinualModel(model, restore(path, backbone, manifest))


def wrap(model: nn.Module | str | Path, config, *, method: str | None = None, seed: int = 0) -> ContinualModel:
    """Wrap an already-loaded HF model (causal LM, encoder or ViT) with a continual method.

    Args:
        model: e.g. ``AutoModelForCausalLM.from_pretrained(path)``; its parameters are frozen. A
            local directory (or ``.gguf`` file) is loaded first: a causal LM with its tokenizer
            (:func:`sharecl.generation.lm.load_causal_lm`), else an encoder or ViT
            (:func:`sharecl.backbone.load_encoder`), so sharecl's own loop can train it too
            (``cl.method.learn(task, TrainConfig())``).
        config: a method config (``ShareConfig``, ``InfLoRAConfig``, ``SDLoRAConfig``,
            ``DualLoRAConfig``, ``LoRAConfig``); ``target_modules=None`` takes the family default.
        method: a registered method name, when the config class serves several (``seq-lora`` for a LoRAConfig).
        seed: seeds every random initialisation.

    Raises:
        TypeError: for a config no method takes; KeyError: for an unknown method name.
    """
    from sharecl.methods import METHODS

    name = method or method_for_config(config)
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; known methods: {sorted(METHODS)}")
    method_cls: Any = METHODS[name]  # every registered method takes (backbone, seed=, config=)
    if isinstance(model, (str, Path)):
        from sharecl.backbone import load_encoder
        from sharecl.generation.lm import is_causal_lm_dir, load_causal_lm

        loaded = load_causal_lm(model) if is_causal_lm_dir(model) else load_encoder(str(model))
        return ContinualModel(loaded.model, method_cls(loaded, seed=seed, config=config))
    for p in model.parameters():
        p.requires_grad_(False)
    causal = any(a.endswith("ForCausalLM") for a in getattr(getattr(model, "config", None), "architectures", None) or []) \
        or hasattr(model, "generate") and hasattr(model, "lm_head")
    backbone = _ModelBackbone(model, "lm" if causal else "text")
    return ContinualModel(model, method_cls(backbone, seed=seed, config=config))
