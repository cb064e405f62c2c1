"""The ``sharecl`` command line (typer + rich).

``sharecl run`` and ``compare`` learn a task stream with several methods side by side;
``serve`` answers over HTTP; ``learn``, ``add-adapter``, ``predict``, ``generate``, ``export``
and ``info`` work on a store (:mod:`sharecl.cli_store`, :mod:`sharecl.store`). Every user error
exits non-zero with one line saying what was wrong and what to do, and leaves the store as it was.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from sharecl import cli_store
from sharecl.cli_checks import user_errors
from sharecl.cli_common import (
    AlignOpt,
    AlignRankOpt,
    AugmentOpt,
    ClipOpt,
    DeviceOpt,
    EOpt,
    FtOpt,
    InitOpt,
    KOpt,
    OptimizerOpt,
    PhiOpt,
    POpt,
    PrecisionOpt,
    WarmupOpt,
    check_align_rank,
    console,
    default_lr,
    rank_options,
    setup_torch,
    share_options,
    takes_share_options,
    target_options,
)

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Continual parameter-efficient fine-tuning: Share (shared LoRA subspaces) and its peers.")


@app.callback()
def _main(reproducible: Annotated[bool, typer.Option(
        "--reproducible", help="Pin MKL's and ATen's CPU code paths (MKL_CBWR=COMPATIBLE, ATEN_CPU_CAPABILITY=default, "
                               "ONEDNN_MAX_CPU_ISA=SSE41) so a seed gives the same numbers on every x86 machine; "
                               "slower (README: Reproducibility).")] = False):
    """Continual parameter-efficient fine-tuning: Share (shared LoRA subspaces) and its peers."""
    if reproducible:
        from sharecl.provenance import reproducible_mode

        reproducible_mode()


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
    k: KOpt = None, p: POpt = None, energy: EOpt = None, phi: PhiOpt = None, init: InitOpt = "zero", merge_finetune_steps: FtOpt = 0,
    rank: Annotated[int, typer.Option("--rank", "-r", help="LoRA rank r (baselines, and Share's first-task seed).")] = 8,
    augment: AugmentOpt = False, warmup_steps: WarmupOpt = 0, max_grad_norm: ClipOpt = None, align: AlignOpt = False,
    align_rank: AlignRankOpt = None,
    optimizer: OptimizerOpt = "adamw",
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads.")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    device: DeviceOpt = "auto", precision: PrecisionOpt = "auto",
):
    """Learn a stream task after task with several methods and report the accuracy matrix side by side.

    Works unchanged under `torchrun --nproc_per_node N` (data parallel; rank 0 writes)."""
    dev = setup_torch(threads, device)
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
    lr = lr if lr is not None else default_lr(s.modality)
    if align and s.scenario != "cil":
        raise ValueError(f"--align re-trains heads to compete across tasks; stream {s.name!r} is task-incremental ({s.scenario})")
    check_align_rank(align, align_rank)
    if align and [m for m in names if not METHODS[m].aligns]:
        raise ValueError(f"--align is not offered for {[m for m in names if not METHODS[m].aligns]} (each task is scored under its "
                         "own features); drop them from --methods")
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, head_lr=lr, seed=seed, augment=augment,
                      warmup_steps=warmup_steps, max_grad_norm=max_grad_norm, align=align, align_rank=align_rank,
                      optimizer=optimizer)
    configs = {m: rank_options(m, rank) for m in names}
    for name in names:  # Share and Share-full take Share's options (and --set share-full.old_task_steps=N)
        if takes_share_options(name):
            configs[name].update(share_options(k, p, energy, rank, phi, init, merge_finetune_steps))
    console.print(f"stream [bold]{s.name}[/]: " + ", ".join(
        f"{t.name} ({getattr(t, 'metric', None) or f'{t.num_classes} classes'}, {len(t.train_inputs)} train)" for t in s))
    results = run_stream(s, names, cfg, out, model_path=model, method_configs=configs, progress=progress, log=console.print,
                         device=dev, precision=precision)
    _print_results(results)
    console.print(f"results in [bold]{out}[/] (results.json and accuracy_matrix.png per method)")


@app.command()
@user_errors
def compare(
    stream: Annotated[str, typer.Option(help="Task stream: text5, text20, text-pairs, fmnist-then-mnist, images20 "
                                             "(task-incremental); wordnet-cil, text20-cil, fmnist-cil, mnist-cil "
                                             "(class-incremental); gen5, gen30 (generation, causal LM).")] = "text5",
    methods: Annotated[str, typer.Option(help="'all' or comma-separated methods.")] = "all",
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds (splits, class order, inits, batches).")] = "0,1,2",
    out: Annotated[Optional[Path], typer.Option(help="Output directory (default runs/compare-<stream>).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Local transformers model directory (default: packaged all-MiniLM-L6-v2).")] = None,
    steps: Annotated[int, typer.Option(help="Optimiser steps per task (joint-lora: steps × tasks).")] = 80,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 16,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate (adapters and heads), the same for every method; default 5e-3 for "
                                                     "text, 1e-3 for image and generation streams.")] = None,
    rank: Annotated[int, typer.Option("--rank", "-r", help="LoRA rank r of every method (Share: first-task seed).")] = 8,
    k: KOpt = None, p: POpt = None,
    train_per_class: Annotated[Optional[int], typer.Option(help="Training examples per class (default: the stream's).")] = None,
    test_per_class: Annotated[Optional[int], typer.Option(help="Test examples per class (default: the stream's).")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Image streams: pixels per side (default 56).")] = None,
    target_modules: Annotated[Optional[str], typer.Option(help="Adapted layers of every method: 'all-linear' (PEFT's spelling) or "
                                                               "comma-separated module names (default: the model family's, "
                                                               "q/v projections).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Method option METHOD.KEY=VALUE (repeatable), e.g. sd-lora.lr=0.001.")] = None,
    augment: AugmentOpt = False, warmup_steps: WarmupOpt = 0, max_grad_norm: ClipOpt = None, align: AlignOpt = False,
    align_rank: AlignRankOpt = None,
    optimizer: OptimizerOpt = "adamw",
    align_recompute: Annotated[bool, typer.Option(help="Measurement only (keeps every task's data): with --align, recompute "
                                                       "old classes' statistics with the current model before each alignment.")] = False,
    tune_lr: Annotated[Optional[str], typer.Option(help="Comma-separated learning rates: each method first runs them on the "
                                                        "validation split of the first seed and keeps its best.")] = None,
    tune_sgd_lr: Annotated[Optional[str], typer.Option(help="With --tune-lr: the rates tried with SGD for a method whose official "
                                                            "code uses it (SD-LoRA); default: the --tune-lr grid x 10.")] = None,
    method_lr: Annotated[Optional[list[str]], typer.Option(help="METHOD=RATE (repeatable): that method's learning rate, chosen "
                                                                "elsewhere (e.g. on another stream's validation split); the "
                                                                "others run at --lr. Not with --tune-lr.")] = None,
    resume: Annotated[bool, typer.Option(help="Reuse results.json files already in OUT.")] = True,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads.")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    device: DeviceOpt = "auto", precision: PrecisionOpt = "auto",
):
    """Run every method on one stream with the same backbone, targets, rank, budget and seeds; write compare.md/json and plots."""
    dev = setup_torch(threads, device)
    from sharecl.compare import all_methods
    from sharecl.compare import compare as run_compare
    from sharecl.data.streams import get_stream
    from sharecl.methods import METHODS
    from sharecl.train import TrainConfig

    try:
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
    out = out or Path(f"runs/compare-{stream}")
    caps = {k: v for k, v in {"train_per_class": train_per_class, "test_per_class": test_per_class,
                              "image_size": image_size}.items() if v is not None}
    first = get_stream(stream, seed=seed_list[0] if seed_list else 0, **caps)
    modality = first.modality
    if align and first.scenario != "cil":
        raise ValueError(f"--align re-trains heads to compete across tasks; stream {stream!r} is task-incremental ({first.scenario})")
    names = all_methods(modality) if methods.strip() == "all" else [m.strip() for m in methods.split(",") if m.strip()]
    if lr is None:
        lr = default_lr(modality)
    if align_recompute and not align:
        raise ValueError("--align-recompute changes what --align keeps; pass --align too")
    check_align_rank(align, align_rank)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, head_lr=lr, augment=augment,
                      warmup_steps=warmup_steps, max_grad_norm=max_grad_norm, align=align, align_rank=align_rank,
                      optimizer=optimizer, align_recompute=align_recompute)
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {sorted(METHODS)}")
    configs = {m: {**rank_options(m, rank), **target_options(m, target_modules)} for m in names}
    for name in names:
        if takes_share_options(name):
            configs[name].update(share_options(k, p, None, rank, None, "zero", 0))
    for item in set_ or []:
        method, key, value = _parse_set(item, names)
        configs[method][key] = value
    try:
        grid = [float(x) for x in tune_lr.split(",") if x.strip()] if tune_lr else None
        sgd_grid = [float(x) for x in tune_sgd_lr.split(",") if x.strip()] if tune_sgd_lr else None
    except ValueError:
        raise ValueError(f"--tune-lr and --tune-sgd-lr must be comma-separated numbers, got {tune_lr!r}, {tune_sgd_lr!r}") from None
    if sgd_grid is not None and grid is None:
        raise ValueError("--tune-sgd-lr only adds SGD rates to a --tune-lr search; pass --tune-lr too")
    summary, md = run_compare(stream, names, seed_list, cfg, out, model_path=model, method_configs=configs,
                              stream_options=caps, tune_lrs=grid, tune_sgd_lrs=sgd_grid, method_lrs=_parse_method_lrs(method_lr),
                              resume=resume, progress=progress, log=console.print, device=dev, precision=precision)
    console.print(md, highlight=False, markup=False)
    console.print(f"written: {out}/compare.md, compare.json, accuracy_curve.png, bytes.png, seed-*/<method>/results.json")


def _parse_method_lrs(items: list[str] | None) -> dict[str, float]:
    """``["share=1e-3", …]`` → ``{"share": 0.001, …}``; which methods are run is checked by ``compare``."""
    out: dict[str, float] = {}
    for item in items or []:
        method, eq, raw = item.partition("=")
        try:
            rate = float(raw)
        except ValueError:
            rate = -1.0
        if not eq or not method.strip() or not rate > 0:
            raise ValueError(f"--method-lr {item!r}: expected METHOD=RATE with a positive rate, for example share=0.001")
        out[method.strip()] = rate
    return out


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


for _command in (cli_store.learn, cli_store.generate, cli_store.predict, cli_store.export, cli_store.info, cli_store.compact):
    app.command()(_command)
app.command("add-adapter")(cli_store.add_adapter)


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
    max_prompt_tokens: Annotated[int, typer.Option(help="Generation: tokens per prompt (at most the store's max_length).")] = 1024,
    max_new_tokens: Annotated[int, typer.Option(help="Generation: the largest max_new_tokens a request may ask for.")] = 256,
    reload_interval: Annotated[float, typer.Option(help="Seconds between checks for a new store version (0: never).")] = 1.0,
    device: DeviceOpt = "cpu", precision: PrecisionOpt = "auto",
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads.")] = None,
    top_tasks: Annotated[Optional[int], typer.Option(help="Requests without a task id, on a Share store learned with --align: "
                                                          "run each input under its M likeliest tasks only.")] = None,
):
    """Serve every task of a store over HTTP: POST /predict (classification) or POST /generate
    (a causal LM's generation tasks), GET /tasks, GET /health, /docs.

    Requests for different tasks are micro-batched into one forward pass (one greedy generate
    call for generation); a new store version written by `sharecl learn` or `add-adapter` is
    picked up without a restart."""
    dev = setup_torch(threads, device)
    from sharecl.serve import ServeConfig
    from sharecl.serve import serve as run_server

    cfg = ServeConfig(host=host, port=port, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_inputs=max_inputs,
                      max_text_chars=max_text_chars, max_body_bytes=max_body_bytes, max_prompt_tokens=max_prompt_tokens,
                      max_new_tokens=max_new_tokens, reload_interval_s=reload_interval, precision=precision,
                      device=dev, top_tasks=top_tasks)
    run_server(store, cfg, log=console.print)


def main() -> None:  # pragma: no cover
    app(sys.argv[1:])
