"""The ``sharecl`` command line (typer + rich).

``sharecl run`` learns a task stream with several methods side by side; ``learn``,
``add-adapter``, ``predict``, ``export`` and ``info`` work on a store (see
:mod:`sharecl.store`). Every user error exits non-zero with one line saying what was wrong
and what to do, and leaves the store as it was.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from sharecl.cli_checks import check_store_options, user_errors

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Continual parameter-efficient fine-tuning: Share (shared LoRA subspaces) and its peers.")
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)


@app.callback()
def _main(reproducible: Annotated[bool, typer.Option(
        "--reproducible", help="Pin MKL's and ATen's CPU code paths (MKL_CBWR=COMPATIBLE, ATEN_CPU_CAPABILITY=default, "
                               "ONEDNN_MAX_CPU_ISA=SSE41) so a seed gives the same numbers on every x86 machine; "
                               "slower (README: Reproducibility).")] = False):
    """Continual parameter-efficient fine-tuning: Share (shared LoRA subspaces) and its peers."""
    if reproducible:
        from sharecl.provenance import reproducible_mode

        reproducible_mode()


def _setup_torch(threads: Optional[int], device: str = "cpu") -> str:
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


def _share_options(k: int, p: int, energy: Optional[float], rank: int, phi: int, init: str, finetune: int) -> dict:
    """ShareConfig overrides from the command line: a fixed k unless --energy is given."""
    return {"k": None if energy is not None else k, "energy": energy, "p": p, "r": rank, "phi": phi, "init": init,
            "merge_finetune_steps": finetune}


def _default_lr(modality: str) -> float:
    """The learning rate by modality (:data:`sharecl.train.DEFAULT_LR`; imported late: torch loads slowly)."""
    from sharecl.train import DEFAULT_LR

    return DEFAULT_LR[modality]

KOpt = Annotated[int, typer.Option(help="Share: basis size k per side (ignored with --energy).")]
POpt = Annotated[int, typer.Option(help="Share: pseudo-rank p, columns of each task's coefficients.")]
EOpt = Annotated[Optional[float], typer.Option(help="Share: choose k by kept energy fraction instead of a fixed k.")]
PhiOpt = Annotated[int, typer.Option(help="Share: temporary directions per side while a task trains (φ).")]
InitOpt = Annotated[str, typer.Option(help="Share: coefficient init, 'zero' (ΔW = 0) or 'previous' (warm start).")]
FtOpt = Annotated[int, typer.Option(help="Share: steps fine-tuning the new task's coefficients after the merge.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N (under torchrun, cuda is each rank's LOCAL_RANK GPU).")]
PrecisionOpt = Annotated[str, typer.Option(help="fp32, or bf16 (bfloat16 autocast of the backbone; weights stay float32).")]
WarmupOpt = Annotated[int, typer.Option(help="Linear learning-rate warm-up over the first N steps of each task (0: none).")]
ClipOpt = Annotated[Optional[float], typer.Option(help="Clip the gradient norm of the trained parameters to this value.")]
AugmentOpt = Annotated[bool, typer.Option(help="Images: train on random resized crops (area 25-100 %) and horizontal flips.")]


@app.command()
@user_errors
def run(
    stream: Annotated[str, typer.Option(help="Task stream to learn.")] = "text5",
    methods: Annotated[str, typer.Option(help="Comma-separated methods.")] = "share,lora-per-task,seq-lora",
    out: Annotated[Path, typer.Option(help="Run directory.")] = Path("runs/text5"),
    model: Annotated[Optional[str], typer.Option(help="Local transformers model directory (default: packaged all-MiniLM-L6-v2).")] = None,
    steps: Annotated[int, typer.Option(help="Optimiser steps per task.")] = 80,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 16,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate (adapters and heads); default 5e-3 for text, 1e-3 for image streams.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for splits, inits and batch order.")] = 0,
    train_per_class: Annotated[Optional[int], typer.Option(help="Training examples per class (default: the stream's, 48 for text).")] = None,
    test_per_class: Annotated[Optional[int], typer.Option(help="Test examples per class (default: the stream's, 30 for text).")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Image streams: pixels per side (default 56; DINOv2's native 224).")] = None,
    k: KOpt = 10, p: POpt = 2, energy: EOpt = None, phi: PhiOpt = 2, init: InitOpt = "zero", merge_finetune_steps: FtOpt = 0,
    rank: Annotated[int, typer.Option("--rank", "-r", help="LoRA rank r (baselines, and Share's first-task seed).")] = 8,
    augment: AugmentOpt = False, warmup_steps: WarmupOpt = 0, max_grad_norm: ClipOpt = None,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads.")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    device: DeviceOpt = "auto", precision: PrecisionOpt = "fp32",
):
    """Learn a stream task after task with several methods and report the accuracy matrix side by side.

    Works unchanged under `torchrun --nproc_per_node N` (data parallel; rank 0 writes)."""
    dev = _setup_torch(threads, device)
    from sharecl.data.streams import get_stream
    from sharecl.runner import run_stream
    from sharecl.train import TrainConfig

    names = [m.strip() for m in methods.split(",") if m.strip()]
    from sharecl.methods import METHODS

    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {sorted(METHODS)}")
    caps = {"train_per_class": train_per_class, "test_per_class": test_per_class, "image_size": image_size}
    s = get_stream(stream, seed=seed, **{k: v for k, v in caps.items() if v is not None})
    lr = lr if lr is not None else _default_lr(s.modality)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, head_lr=lr, seed=seed, augment=augment,
                      warmup_steps=warmup_steps, max_grad_norm=max_grad_norm)
    configs = {m: {"r": rank} for m in names}
    if "share" in configs:
        configs["share"].update(_share_options(k, p, energy, rank, phi, init, merge_finetune_steps))
    console.print(f"stream [bold]{s.name}[/]: " + ", ".join(
        f"{t.name} ({getattr(t, 'metric', None) or f'{t.num_classes} classes'}, {len(t.train_inputs)} train)" for t in s))
    results = run_stream(s, names, cfg, out, model_path=model, method_configs=configs, progress=progress, log=console.print,
                         device=dev, precision=precision)
    _print_results(results)
    console.print(f"results in [bold]{out}[/] (results.json and accuracy_matrix.png per method)")


@app.command()
@user_errors
def compare(
    stream: Annotated[str, typer.Option(help="Task stream: text5, fmnist-then-mnist (task-incremental); wordnet-cil, fmnist-cil, "
                                             "mnist-cil (class-incremental); gen5 (generation, causal LM).")] = "text5",
    methods: Annotated[str, typer.Option(help="'all' or comma-separated methods.")] = "all",
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds (splits, class order, inits, batches).")] = "0,1,2",
    out: Annotated[Optional[Path], typer.Option(help="Output directory (default runs/compare-<stream>).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Local transformers model directory (default: packaged all-MiniLM-L6-v2).")] = None,
    steps: Annotated[int, typer.Option(help="Optimiser steps per task (joint-lora: steps × tasks).")] = 80,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 16,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate (adapters and heads), the same for every method; default 5e-3 for "
                                                     "text, 1e-3 for image and generation streams.")] = None,
    rank: Annotated[int, typer.Option("--rank", "-r", help="LoRA rank r of every method (Share: first-task seed).")] = 8,
    k: KOpt = 10, p: POpt = 2,
    train_per_class: Annotated[Optional[int], typer.Option(help="Training examples per class (default: the stream's).")] = None,
    test_per_class: Annotated[Optional[int], typer.Option(help="Test examples per class (default: the stream's).")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Image streams: pixels per side (default 56).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Method option METHOD.KEY=VALUE (repeatable), e.g. sd-lora.lr=0.001.")] = None,
    augment: AugmentOpt = False, warmup_steps: WarmupOpt = 0, max_grad_norm: ClipOpt = None,
    resume: Annotated[bool, typer.Option(help="Reuse results.json files already in OUT.")] = True,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads.")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    device: DeviceOpt = "auto", precision: PrecisionOpt = "fp32",
):
    """Run every method on one stream with the same backbone, targets, rank, budget and seeds; write compare.md/json and plots."""
    dev = _setup_torch(threads, device)
    from sharecl.compare import all_methods
    from sharecl.compare import compare as run_compare
    from sharecl.data.streams import get_stream
    from sharecl.train import TrainConfig

    try:
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
    out = out or Path(f"runs/compare-{stream}")
    caps = {k: v for k, v in {"train_per_class": train_per_class, "test_per_class": test_per_class,
                              "image_size": image_size}.items() if v is not None}
    modality = get_stream(stream, seed=seed_list[0] if seed_list else 0, **caps).modality
    names = all_methods(modality) if methods.strip() == "all" else [m.strip() for m in methods.split(",") if m.strip()]
    if lr is None:
        lr = _default_lr(modality)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, head_lr=lr, augment=augment,
                      warmup_steps=warmup_steps, max_grad_norm=max_grad_norm)
    configs = {m: ({} if m in ("head-only", "zero-shot") else {"r": rank}) for m in names}
    if "share" in configs:
        configs["share"].update(_share_options(k, p, None, rank, 2, "zero", 0))
    for item in set_ or []:
        method, key, value = _parse_set(item, names)
        configs[method][key] = value
    summary, md = run_compare(stream, names, seed_list, cfg, out, model_path=model, method_configs=configs,
                              stream_options=caps,
                              resume=resume, progress=progress, log=console.print, device=dev, precision=precision)
    console.print(md, highlight=False, markup=False)
    console.print(f"written: {out}/compare.md, compare.json, accuracy_curve.png, bytes.png, seed-*/<method>/results.json")


def _parse_set(item: str, methods: list[str]) -> tuple[str, str, object]:
    """``METHOD.KEY=VALUE`` → ``(method, key, value)``; VALUE is read as JSON when it parses, else kept as text."""
    head, eq, raw = item.partition("=")
    method, dot, key = head.rpartition(".")
    if not eq or not dot or not key:
        raise ValueError(f"--set {item!r}: expected METHOD.KEY=VALUE, for example sd-lora.lr=0.001")
    if method not in methods:
        raise ValueError(f"--set {item!r}: method {method!r} is not among the methods run ({', '.join(methods)})")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return method, key, value


def _print_results(results: dict[str, dict]) -> None:
    for name, res in results.items():
        t = Table(title=f"{name}: accuracy matrix (%), row = after learning task i")
        t.add_column("after")
        for n in res["tasks"]:
            t.add_column(n, justify="right")
        for n, row in zip(res["tasks"], res["accuracy_matrix"]):
            t.add_row(n, *["" if v is None else f"{100 * v:.1f}" for v in row])
        console.print(t)
    s = Table(title="summary")
    for col in ("method", "final acc %", "avg incr acc %", "forgetting", "BWT", "adapter bytes/task", "head bytes/task",
                "shared bytes", "train s"):
        s.add_column(col, justify="right")
    for name, r in results.items():
        pct = [("—" if r[key] is None else f"{100 * r[key]:.2f}")
               for key in ("final_average_accuracy", "average_incremental_accuracy", "forgetting", "bwt")]
        s.add_row(name, *pct, f"{r['bytes_per_task']:,.0f}",
                  f"{r['head_bytes_per_task']:,.0f}", f"{r['bytes_shared']:,}", f"{r['train_seconds_total']:.0f}")
    console.print(s)


@app.command()
@user_errors
def learn(
    store: Annotated[Path, typer.Argument(help="Store directory (created if missing).")],
    task: Annotated[str, typer.Option(help="New task name (for a stream file: one of its tasks, e.g. my-cifar-2).")],
    data: Annotated[Path, typer.Option(help="Text: CSV/JSONL file or datasets directory. Images: image folder "
                                            "root/<class>/*, datasets directory with an Image column, or stream file.")],
    model: Annotated[Optional[str], typer.Option(help="Base model directory for a new store (default: packaged MiniLM "
                                                      "for text, the packaged DINOv2 ViT-S/14 for images).")] = None,
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 80,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 16,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate (default 5e-3 for text, 1e-3 for images).")] = None,
    seed: Annotated[int, typer.Option(help="Seed (split, init, batch order).")] = 0,
    k: Annotated[Optional[int], typer.Option(help="Share, new store: basis size k per side (default 10).")] = None,
    p: Annotated[Optional[int], typer.Option(help="Share, new store: pseudo-rank p (default 2).")] = None,
    energy: EOpt = None,
    phi: Annotated[Optional[int], typer.Option(help="Share, new store: temporary directions per side (default 2).")] = None,
    init: Annotated[Optional[str], typer.Option(help="Share, new store: 'zero' (default) or 'previous'.")] = None,
    merge_finetune_steps: Annotated[Optional[int], typer.Option(help="Share, new store: merge fine-tuning steps (default 0).")] = None,
    rank: Annotated[Optional[int], typer.Option("--rank", "-r", help="LoRA rank of a new store (default 8; Share: the first task's "
                                                                     "seeding LoRA).")] = None,
    method_name: Annotated[Optional[str], typer.Option("--method", help="Method of a new store: share (default), inflora, sd-lora, "
                                                                        "sd-lora-rr, sd-lora-kd, dual-lora.")] = None,
    text_column: str = "text", label_column: str = "label", image_column: str = "image",
    image_size: Annotated[Optional[int], typer.Option(help="New vision store: pixels per side (default: the stream "
                                                           "file's, else 56).")] = None,
    augment: AugmentOpt = False, warmup_steps: WarmupOpt = 0, max_grad_norm: ClipOpt = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    device: DeviceOpt = "auto", precision: PrecisionOpt = "fp32",
):
    """Teach a store one new task from labelled text or images (creates the store on first use).

    A store is open-ended: InfLoRA's and DualLoRA's memory threshold stays at its starting value.
    On an existing store, the options that define it (--method, --model, --rank, --k, --p,
    --energy, --phi, --init, --merge-finetune-steps, --image-size) may be omitted; one that
    contradicts the store is refused before anything is trained.
    Under `torchrun` every rank trains on its shard of each batch and rank 0 alone locks and
    writes the store (on a filesystem every node sees); if any rank fails, the store keeps its
    previous version.
    """
    dev = _setup_torch(None, device)
    from sharecl import distributed as dist
    from sharecl.backbone import load_encoder
    from sharecl.data.files import load_task_file
    from sharecl.data.image_files import image_source_kind, load_image_task
    from sharecl.data.tasks import check_task_name
    from sharecl.methods import build_method
    from sharecl.store import STORABLE, load_store, save_store, store_lock
    from sharecl.train import TrainConfig, evaluate
    from sharecl.vision.convert import default_vit_path

    check_task_name(task)
    share_opts = {"k": k, "p": p, "energy": energy, "phi": phi, "init": init, "merge_finetune_steps": merge_finetune_steps}
    if method_name is not None and method_name not in STORABLE:
        raise ValueError(f"--method {method_name!r} cannot be stored; choose one of {', '.join(STORABLE)}")
    kind = image_source_kind(data)  # the data is read before the store is touched: its errors change nothing
    if kind:
        t, stream_size = load_image_task(data, task, seed=seed, image_column=image_column, label_column=label_column)
    else:
        t, stream_size = load_task_file(data, task, seed=seed, text_column=text_column, label_column=label_column), None
    modality = "image" if kind else "text"
    with dist.main_rank_lock(lambda: store_lock(store)):
        if (store / "manifest.json").exists():
            moved = check_store_options(store, method_name, model, rank, image_size, share_opts)
            method = load_store(store, model_path=moved, device=dev, precision=precision)
        else:
            method_name, rank = method_name or "share", rank or 8
            if method_name == "share":
                opts = _share_options(10 if k is None else k, p or 2, energy, rank, 2 if phi is None else phi,
                                      init or "zero", merge_finetune_steps or 0)
            else:
                given = [f"--{n.replace('_', '-')}" for n, v in share_opts.items() if v is not None]
                if given:
                    raise ValueError(f"{', '.join(given)} apply to Share stores only, not --method {method_name}")
                opts = {"r": rank}
            enc = load_encoder(model or (str(default_vit_path()) if kind else None), device=dev, precision=precision,
                               image_size=image_size or stream_size or 56)
            method = build_method(method_name, enc, seed=seed, **opts)
        reads = "image" if method.encoder.images is not None else "text"
        if reads != modality:
            raise ValueError(f"{data} holds {modality} data but the model ({method.encoder.path}) reads {reads}; "
                             + ("pass --model with a ViT/DINOv2 directory (or omit it) for a new image store"
                                if reads == "text" else "use a text store, or image data for this one"))
        if task in method.task_classes:
            raise ValueError(f"task {task!r} already exists in {store}; choose another name")
        lr = lr if lr is not None else _default_lr(modality)
        cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, head_lr=lr, seed=seed,
                          max_length=method.encoder.max_length, augment=augment, warmup_steps=warmup_steps,
                          max_grad_norm=max_grad_norm)
        method.learn(t, cfg, progress=progress)
        acc = evaluate(lambda xs: method.logits(xs, task), t, 64)
        dist.barrier()  # every rank finished: a rank lost before this point leaves the store untouched
        manifest = save_store(method, store) if dist.is_main() else None
    if not dist.is_main():
        return
    console.print(f"learned [bold]{task}[/] ({t.num_classes} classes, {len(t.train_inputs)} train): "
                  f"held-out accuracy {100 * acc:.1f}% on {len(t.test_inputs)} examples; store version {manifest['version']}")


@app.command("add-adapter")
@user_errors
def add_adapter(
    store: Annotated[Path, typer.Argument(help="Existing store directory.")],
    adapter: Annotated[Path, typer.Argument(help="PEFT LoRA adapter directory.")],
    task: Annotated[str, typer.Option(help="New task name.")],
    any_rank: Annotated[bool, typer.Option(help="Accept an adapter whose rank differs from the store's r.")] = False,
):
    """Fold a PEFT LoRA adapter trained elsewhere into the store, without data."""
    _setup_torch(None)
    from sharecl.backbone import weights_hash
    from sharecl.interop.peft import AdapterError, read_lora_adapter
    from sharecl.store import load_store, read_manifest, save_store, store_lock

    with store_lock(store):
        manifest = read_manifest(store)
        if manifest.get("method") != "share":
            raise ValueError(f"{store} holds method {manifest.get('method')!r}; only Share stores fold adapters without data")
        lora = read_lora_adapter(adapter)
        base = lora.config.get("base_model_name_or_path")
        if base and Path(base).is_dir() and weights_hash(base) != manifest["base_model"]["sha256"]:
            raise AdapterError(f"{adapter} was trained on {base}, whose weights differ from this store's base model")
        if lora.rank != manifest["config"]["r"] and not any_rank:
            raise AdapterError(f"{adapter} has rank {lora.rank}, the store was built for rank {manifest['config']['r']}; "
                               f"pass --any-rank to fold it anyway (it is truncated to p={manifest['config']['p']})")
        method = load_store(store)
        rec = method.add_adapter(task, lora.factors, lora.scaling)
        manifest = save_store(method, store)
    worst = max((v["max"] for v in rec["per_task"].values()), default=0.0)
    console.print(f"folded {adapter} as task [bold]{task}[/]; largest drift of an old task {100 * worst:.3f}%; "
                  f"its own truncation to p {100 * rec['new_task']['truncation_max']:.2f}%; store version {manifest['version']}")


@app.command()
@user_errors
def predict(
    store: Annotated[Path, typer.Argument(help="Store directory.")],
    inputs: Annotated[list[str], typer.Argument(help="Texts to classify; for a vision store, image files.")],
    task: Annotated[str, typer.Option(help="Task whose adapter and head answer.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
):
    """Classify texts (or image files, for a store built on a vision model) with one task of a store."""
    _setup_torch(None)
    import torch

    from sharecl.store import load_store

    method = load_store(store)
    method.check_task(task)
    if task not in method.heads:
        raise ValueError(f"task {task!r} was added as an adapter only and has no classification head; it can be exported, not predicted")
    xs = list(inputs)
    if method.encoder.images is not None:
        from sharecl.data.image_files import read_image

        xs = [read_image(x, max_side=method.encoder.images.decode_side) for x in inputs]  # as `sharecl serve` decodes
    with torch.no_grad():
        probs = method.logits(xs, task).softmax(-1)
    classes = method.task_classes[task]
    key = "image" if method.encoder.images is not None else "text"
    for text, pr in zip(inputs, probs):
        i = int(pr.argmax())
        if as_json:
            print(json.dumps({key: text, "label": classes[i], "probability": round(float(pr[i]), 6)}))
        else:
            console.print(f"{classes[i]}\t{float(pr[i]):.3f}\t{text[:80]}", highlight=False)


@app.command()
@user_errors
def export(
    store: Annotated[Path, typer.Argument(help="Store directory.")],
    out: Annotated[Path, typer.Argument(help="New directory for the PEFT adapter.")],
    task: Annotated[str, typer.Option(help="Task to export.")],
):
    """Write one task as a plain PEFT LoRA adapter (loads with peft.PeftModel.from_pretrained)."""
    _setup_torch(None)
    from sharecl.interop.peft import export_task
    from sharecl.store import load_store

    method = load_store(store)
    if method.name != "share":
        raise ValueError(f"{store} holds method {method.name!r}; export writes Share tasks as PEFT adapters")
    path = export_task(method, task, out)
    console.print(f"wrote PEFT LoRA adapter for [bold]{task}[/] (rank {method.config.p}) to {path}")


@app.command()
@user_errors
def serve(
    store: Annotated[Path, typer.Argument(help="Store directory.")],
    host: Annotated[str, typer.Option(help="Interface to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    max_batch_size: Annotated[int, typer.Option(help="Rows per mixed-task forward pass.")] = 64,
    max_wait_ms: Annotated[float, typer.Option(help="How long a batch waits for more requests (ms).")] = 5.0,
    max_inputs: Annotated[int, typer.Option(help="Inputs per request.")] = 64,
    max_text_chars: Annotated[int, typer.Option(help="Characters per input text.")] = 16_000,
    max_body_bytes: Annotated[int, typer.Option(help="Request body limit in bytes.")] = 1_000_000,
    reload_interval: Annotated[float, typer.Option(help="Seconds between checks for a new store version (0: never).")] = 1.0,
    device: DeviceOpt = "cpu",
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads.")] = None,
):
    """Serve every task of a store over HTTP: POST /predict, GET /tasks, GET /health, /docs.

    Requests for different tasks are micro-batched into one forward pass; a new store version
    written by `sharecl learn` or `add-adapter` is picked up without a restart."""
    dev = _setup_torch(threads, device)
    from sharecl.serve import ServeConfig
    from sharecl.serve import serve as run_server

    cfg = ServeConfig(host=host, port=port, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_inputs=max_inputs,
                      max_text_chars=max_text_chars, max_body_bytes=max_body_bytes, reload_interval_s=reload_interval,
                      device=dev)
    run_server(store, cfg, log=console.print)


@app.command()
@user_errors
def info(store: Annotated[Path, typer.Argument(help="Store directory.")]):
    """Describe a store: base model, config, tasks, sizes, last merge drift."""
    from sharecl.store import read_manifest

    m = read_manifest(store)
    console.print(f"[bold]{store}[/]  version {m['version']}  method {m['method']}  base {m['base_model']['path']} "
                  f"(sha256 {m['base_model']['sha256'][:12]}…)")
    console.print("config: " + ", ".join(f"{k}={v}" for k, v in m["config"].items()))
    t = Table(title=f"{len(m['tasks'])} task(s)")
    for col in ("task", "kind", "classes"):
        t.add_column(col)
    for task in m["tasks"]:
        t.add_row(task["name"], task["kind"], ", ".join(task["classes"]) or "-")
    console.print(t)
    size = sum(f.stat().st_size for f in Path(store).iterdir() if f.is_file())
    console.print(f"on disk: {size:,} bytes")
    if m.get("merges"):
        last = m["merges"][-1]
        worst = max((v["max"] for v in last["per_task"].values()), default=0.0)
        console.print(f"last merge (after {last['after_task']}): k per side {last['k'][0]}, largest old-task drift {100 * worst:.3f}%")
        cuts = [(r["after_task"], r["new_task"]["truncation_max"]) for r in m["merges"] if "new_task" in r]
        if cuts:
            name, cut = max(cuts, key=lambda c: c[1])
            console.print(f"own truncation of a task to p={m['config']['p']} (‖ΔW − ΔW^(p)‖/‖ΔW‖, worst layer): "
                          f"largest {100 * cut:.2f}% ({name})")


def main() -> None:  # pragma: no cover
    app(sys.argv[1:])
