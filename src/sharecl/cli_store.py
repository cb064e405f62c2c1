"""``sharecl`` commands on a store: ``learn``, ``add-adapter``, ``predict``, ``generate``,
``export`` and ``info`` (registered on the app by :mod:`sharecl.cli`).

A store holds classification tasks (text or images, :mod:`sharecl.backbone`) or generation
tasks on a causal LM (:mod:`sharecl.generation`), never both: the kind is fixed by its base
model, and data of the other kind is refused before anything is loaded or trained.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from sharecl.cli_checks import check_store_options, err, user_errors
from sharecl.cli_common import (
    AugmentOpt,
    ClipOpt,
    DeviceOpt,
    EOpt,
    PrecisionOpt,
    WarmupOpt,
    check_align_rank,
    console,
    default_lr,
    setup_torch,
    share_options,
    takes_share_options,
)

#: What each store modality holds, for error messages.
_KIND_WORDS = {"text": "text classification", "image": "image classification", "lm": "generation (prompt/completion)"}


def _data_kind(data: Path) -> str:
    """``image``, ``lm`` (prompt/completion or chat pairs) or ``text`` (labelled texts), from the data alone."""
    from sharecl.data.image_files import image_source_kind
    from sharecl.generation.tasks import is_generation_file

    if image_source_kind(data):
        return "image"
    return "lm" if is_generation_file(data) else "text"


def _check_store_kind(store: Path, modality: str, data: Path) -> None:
    """Refuse data of another kind than the store's tasks, before the store is loaded.

    Raises:
        ValueError: naming both kinds and what to do.
    """
    from sharecl.store import read_manifest

    held = read_manifest(store).get("modality") or "text"
    if held != modality:
        model = {"text": "the packaged MiniLM, or --model with an encoder directory",
                 "image": "the packaged DINOv2 ViT-S/14, or --model with a ViT/DINOv2 directory",
                 "lm": "the packaged SmolLM2, or --model with a causal LM directory or .gguf file"}[modality]
        raise ValueError(f"{data} holds {_KIND_WORDS[modality]} data but {store} holds {_KIND_WORDS[held]} tasks on "
                         f"its base model; use another store (a new directory: it takes {model}) for this task")


def _new_backbone(modality: str, model: Optional[str], data: Path, dev: str, precision: str, image_size: int):
    """The base model of a new store: the given one, else the packaged one for the data's kind.

    Raises:
        ValueError: a model that cannot read this kind of data.
    """
    from sharecl.backbone import load_encoder
    from sharecl.generation.lm import is_causal_lm_dir, load_causal_lm
    from sharecl.vision.convert import default_vit_path

    if modality == "lm":
        if model is not None and not is_causal_lm_dir(model):
            raise ValueError(f"{data} holds prompt/completion pairs, but --model {model} is not a causal LM "
                             f"(no *ForCausalLM architecture, nor a .gguf file); pass one, or omit --model for the packaged SmolLM2")
        return load_causal_lm(model, device=dev, precision=precision)
    if model is not None and is_causal_lm_dir(model):
        raise ValueError(f"--model {model} is a causal LM, which learns generation tasks: give it a file with "
                         f"'prompt' and 'completion' columns (or 'messages'), or pass an encoder for {data}")
    return load_encoder(model or (str(default_vit_path()) if modality == "image" else None), device=dev, precision=precision,
                        image_size=image_size)


@user_errors
def learn(
    store: Annotated[Path, typer.Argument(help="Store directory (created if missing).")],
    task: Annotated[str, typer.Option(help="New task name (for a stream file: one of its tasks, e.g. my-cifar-2).")],
    data: Annotated[Path, typer.Option(help="Text: CSV/JSONL file or datasets directory ('text', 'label'). Generation: the "
                                            "same with 'prompt' and 'completion' (or chat 'messages'). Images: image folder "
                                            "root/<class>/*, datasets directory with an Image column, or stream file.")],
    model: Annotated[Optional[str], typer.Option(help="Base model of a new store: a directory, or a .gguf file for a causal LM "
                                                      "(default: packaged MiniLM for text, SmolLM2-135M-Instruct for generation, "
                                                      "DINOv2 ViT-S/14 for images).")] = None,
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 80,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 16,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate (default 5e-3 for text, 1e-3 for images and generation).")] = None,
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
    metric: Annotated[str, typer.Option(help="Generation: how the held-out answers are scored, rouge-l or exact-match.")] = "rouge-l",
    max_new_tokens: Annotated[int, typer.Option(help="Generation: most tokens of a held-out answer.")] = 32,
    augment: AugmentOpt = False, warmup_steps: WarmupOpt = 0, max_grad_norm: ClipOpt = None,
    align: Annotated[bool, typer.Option(help="Classification stores, from the first task on: keep each class's feature mean "
                                             "and covariance and re-align every head after each task (SLCA), so predictions "
                                             "without a task id compare calibrated heads. A store learned so keeps aligning.")] = False,
    align_rank: Annotated[Optional[int], typer.Option(help="With --align: keep covariances as their top-R eigenvectors plus a "
                                                           "diagonal (default: full).")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    device: DeviceOpt = "auto", precision: PrecisionOpt = "auto",
):
    """Teach a store one new task from labelled text or images, or from prompt/completion pairs
    on a causal LM (creates the store on first use).

    A store is open-ended: InfLoRA's and DualLoRA's memory threshold stays at its starting value.
    On an existing store, the options that define it (--method, --model, --rank, --k, --p,
    --energy, --phi, --init, --merge-finetune-steps, --image-size) may be omitted; one that
    contradicts the store is refused before anything is trained.
    Under `torchrun` every rank trains on its shard of each batch and rank 0 alone locks and
    writes the store (on a filesystem every node sees); if any rank fails, the store keeps its
    previous version.
    """
    dev = setup_torch(None, device)
    from sharecl import distributed as dist
    from sharecl.data.files import load_task_file
    from sharecl.data.image_files import load_image_task
    from sharecl.data.tasks import check_task_name
    from sharecl.generation.tasks import load_generation_file
    from sharecl.methods import build_method
    from sharecl.store import load_store, save_store, storable_methods, store_lock
    from sharecl.train import TrainConfig

    check_task_name(task)
    check_align_rank(align, align_rank)
    share_opts = {"k": k, "p": p, "energy": energy, "phi": phi, "init": init, "merge_finetune_steps": merge_finetune_steps}
    if method_name is not None and method_name not in storable_methods():
        raise ValueError(f"--method {method_name!r} cannot be stored; choose one of {', '.join(storable_methods())}")
    modality, stream_size = _data_kind(data), None  # the data is read before the store is touched: its errors change nothing
    if modality == "image":
        t, stream_size = load_image_task(data, task, seed=seed, image_column=image_column, label_column=label_column)
    elif modality == "lm":
        t = load_generation_file(task, data, seed=seed, metric=metric, max_new_tokens=max_new_tokens)
    else:
        t = load_task_file(data, task, seed=seed, text_column=text_column, label_column=label_column)
    with dist.main_rank_lock(lambda: store_lock(store)):
        if (store / "manifest.json").exists():
            _check_store_kind(store, modality, data)
            moved = check_store_options(store, method_name, model, rank, image_size, share_opts)
            method = load_store(store, model_path=moved, device=dev, precision=precision)
        else:
            method_name, rank = method_name or "share", rank or 8
            if takes_share_options(method_name):
                opts = share_options(k, p, energy, rank, phi, init or "zero", merge_finetune_steps or 0)
            else:
                given = [f"--{n.replace('_', '-')}" for n, v in share_opts.items() if v is not None]
                if given:
                    raise ValueError(f"{', '.join(given)} apply to Share stores only, not --method {method_name}")
                opts = {"r": rank}
            enc = _new_backbone(modality, model, data, dev, precision, image_size or stream_size or 56)
            method = build_method(method_name, enc, seed=seed, **opts)
        reads = method.modality
        if reads != modality:
            raise ValueError(f"{data} holds {modality} data but the model ({method.encoder.path}) reads {reads}; "
                             + ("pass --model with a ViT/DINOv2 directory (or omit it) for a new image store"
                                if reads == "text" else "use a text store, or image data for this one"))
        if task in method.task_classes:
            raise ValueError(f"task {task!r} already exists in {store}; choose another name")
        _check_align(method, align, store, modality)
        lr = lr if lr is not None else default_lr(modality)
        cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, head_lr=lr, seed=seed,
                          max_length=method.encoder.max_length, augment=augment, warmup_steps=warmup_steps,
                          max_grad_norm=max_grad_norm, align=align, align_rank=align_rank)
        method.learn(t, cfg, progress=progress)
        score, what = _held_out(method, t)
        dist.barrier()  # every rank finished: a rank lost before this point leaves the store untouched
        manifest = save_store(method, store) if dist.is_main() else None
    if not dist.is_main() or manifest is None:
        return
    size = f"{t.num_classes} classes, " if modality != "lm" else ""
    console.print(f"learned [bold]{task}[/] ({size}{len(t.train_inputs)} train): held-out {what} {100 * score:.1f}% "
                  f"on {len(t.test_inputs)} examples; store version {manifest['version']}")


def _check_align(method, align: bool, store: Path, modality: str) -> None:
    """Refuse ``--align`` before training where it cannot work: generation stores, methods
    without one feature space, or a store whose tasks were learned without it (alignment needs
    every task's class statistics, and they cannot be recomputed without the old data)."""
    if not align:
        return
    if modality == "lm":
        raise ValueError("--align calibrates classification heads; a generation store has none: drop --align")
    if not method.aligns:
        raise ValueError(f"--method {method.name} scores each task in its own feature space; --align needs one: drop it")
    if method.task_names and not method.aligns_every_task():
        raise ValueError(f"{store} was learned without --align: its tasks have no class statistics, which alignment needs "
                         "for every task (they cannot be computed without the old data); drop --align, or start a new "
                         "store with --align from its first task")


def _held_out(method, task) -> tuple[float, str]:
    """The task's held-out score (a fraction) and what it is: accuracy, or the generation metric."""
    from sharecl.objectives import objective_of

    objective = objective_of(task)
    return objective.score(method, task, 64 if objective.kind == "classification" else 16), objective.metric(task)


@user_errors
def add_adapter(
    store: Annotated[Path, typer.Argument(help="Existing store directory.")],
    adapters: Annotated[list[Path], typer.Argument(help="PEFT LoRA adapter directories; several are folded as one batch.")],
    task: Annotated[list[str], typer.Option(help="New task name, once per adapter, in the same order.")],
    any_rank: Annotated[bool, typer.Option(help="Accept an adapter whose rank differs from the store's r.")] = False,
    trust_base: Annotated[bool, typer.Option(help="Fold an adapter whose base model cannot be verified (it names a hub id, "
                                                  "or nothing) as if trained on the store's base model.")] = False,
):
    """Fold PEFT LoRA adapters trained elsewhere into the store, without data.

    Each adapter may cover any subset of the store's target layers (the others get no update)
    and use any lora_alpha or rsLoRA scaling. Its base model must be the store's: a local
    directory or .gguf file it names is checked by sha256; a hub id needs --trust-base. Several
    adapters are one batch (the paper's batch arrival): every one is checked first, and the basis
    is truncated once, after the last."""
    setup_torch(None)
    from sharecl.interop.peft import AdapterError, check_adapter_base, read_lora_adapter
    from sharecl.store import load_store, read_manifest, save_store, store_lock

    if len(task) != len(adapters):
        raise ValueError(f"{len(adapters)} adapter(s) but {len(task)} --task name(s): give one --task per adapter, in order")
    with store_lock(store):
        manifest = read_manifest(store)
        from sharecl.methods.registry import methods_where

        folding = methods_where(folds_adapters=True)
        if manifest.get("method") not in folding:
            raise ValueError(f"{store} holds method {manifest.get('method')!r}; only {', '.join(folding)} stores fold adapters without data")
        loras = []
        for adapter in adapters:
            lora = read_lora_adapter(adapter)
            check_adapter_base(lora, manifest["base_model"], trust=trust_base)
            if lora.rank != manifest["config"]["r"] and not any_rank:
                raise AdapterError(f"{adapter} has rank {lora.rank}, the store was built for rank {manifest['config']['r']}; "
                                   f"pass --any-rank to fold it anyway (it is truncated to p={manifest['config']['p']})")
            loras.append(lora)
        method = load_store(store)
        records = method.add_adapters([(name, lora.factors, lora.scaling) for name, lora in zip(task, loras)])
        manifest = save_store(method, store)
    worst = max((v["max"] for v in records[-1]["per_task"].values()), default=0.0)
    for adapter, name, rec in zip(adapters, task, records):
        skipped = f"; {rec['layers_without_update']} target layer(s) not in the adapter get no update" if rec.get("layers_without_update") else ""
        console.print(f"folded {adapter} as task [bold]{name}[/]; its own truncation to p "
                      f"{100 * rec['new_task']['truncation_max']:.2f}%{skipped}")
    console.print(f"largest drift of an old task {100 * worst:.3f}%; store version {manifest['version']}")


@user_errors
def predict(
    store: Annotated[Path, typer.Argument(help="Store directory.")],
    inputs: Annotated[list[str], typer.Argument(help="Texts to classify; for a vision store, image files.")],
    task: Annotated[Optional[str], typer.Option(help="Task whose adapter and head answer. Omitted: no task id — every task's "
                                                     "classes compete (class-incremental; the method's own rule, calibrated "
                                                     "when the store was learned with --align).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
    top_tasks: Annotated[Optional[int], typer.Option(help="Without --task, a Share store learned with --align: run each input "
                                                          "only under its M most likely tasks (1 + M forward passes instead "
                                                          "of 1 + T); probabilities are renormalised over those tasks "
                                                          "(--json: tasks_scored).")] = None,
):
    """Classify texts (or image files, for a store built on a vision model) with one task of a
    store, or, without --task, with all of them (the answer names the task and its class)."""
    setup_torch(None)
    import torch

    from sharecl.store import load_store

    if top_tasks is not None and task is not None:
        raise ValueError("--top-tasks chooses tasks for inputs without a task id: drop --task, or drop --top-tasks")
    method = load_store(store)
    if top_tasks is not None:
        from sharecl.methods.share_cil import set_top_tasks

        set_top_tasks(method, top_tasks)
    if task is not None:
        method.check_task(task)
    if method.modality == "lm":
        raise ValueError(f"{store} holds generation tasks on a causal LM; use `sharecl generate {store} --task TASK PROMPT …`")
    headless = [t for t in ([task] if task else method.task_names) if t not in method.heads]
    if headless:
        raise ValueError(f"task(s) {headless[:3]} were added as adapters only and have no classification head; they can be "
                         "exported, not predicted" + ("; pass --task with a task that has one" if task is None else ""))
    xs: list = list(inputs)
    if method.encoder.images is not None:
        from sharecl.data.image_files import read_image

        xs = [read_image(x, max_side=method.encoder.images.decode_side) for x in inputs]  # as `sharecl serve` decodes
    with torch.no_grad():
        if task is not None:
            probs, labels = method.logits(xs, task).softmax(-1), [(task, c) for c in method.task_classes[task]]
        else:  # every seen class, in task order (as the class-incremental evaluation scores them)
            probs = method.cil_logits(xs).softmax(-1)
            labels = [(t, c) for t in method.task_names for c in method.task_classes[t]]
    key = "image" if method.encoder.images is not None else "text"
    # with --top-tasks the probabilities are renormalised over the tasks that ran: say how many did
    scored = {} if top_tasks is None else {"tasks_scored": min(top_tasks, len(method.task_names))}
    if scored and not as_json:
        err.print(f"each input ran under its {scored['tasks_scored']} likeliest of {len(method.task_names)} tasks; "
                  "probabilities are renormalised over those", highlight=False)
    for text, pr in zip(inputs, probs):
        i = int(pr.argmax())
        (t, label), prob = labels[i], float(pr[i])
        if as_json:
            print(json.dumps({key: text, **({} if task else {"task": t}), "label": label, "probability": round(prob, 6),
                              **scored}))
        else:
            prefix = "" if task else f"{t}\t"
            console.print(f"{prefix}{label}\t{prob:.3f}\t{text[:80]}", highlight=False)


@user_errors
def generate(
    store: Annotated[Path, typer.Argument(help="Store directory (generation tasks on a causal LM).")],
    prompts: Annotated[list[str], typer.Argument(help="Prompts to answer.")],
    task: Annotated[str, typer.Option(help="Task whose adapter answers.")],
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens per answer.")] = 64,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
    device: DeviceOpt = "cpu", precision: PrecisionOpt = "auto",
):
    """Answer prompts with one generation task of a store (greedy decoding, as `sharecl serve` and evaluation do)."""
    dev = setup_torch(None, device)
    from sharecl.store import load_store, read_manifest

    if (read_manifest(store).get("modality") or "text") != "lm":
        raise ValueError(f"{store} holds classification tasks; use `sharecl predict {store} --task {task} INPUT …`")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be ≥ 1, got {max_new_tokens}")
    method = load_store(store, device=dev, precision=precision)
    method.check_task(task)
    ids = method.mixed_generate(list(prompts), [task] * len(prompts), [max_new_tokens] * len(prompts))
    for prompt, row in zip(prompts, ids):
        text = method.encoder.decode(row)
        if as_json:
            print(json.dumps({"prompt": prompt, "text": text, "tokens": len(row)}, ensure_ascii=False))
        else:
            console.print(text, highlight=False, markup=False)


@user_errors
def export(
    store: Annotated[Path, typer.Argument(help="Store directory.")],
    out: Annotated[Path, typer.Argument(help="New directory for the PEFT adapter.")],
    task: Annotated[str, typer.Option(help="Task to export.")],
):
    """Write one task as a plain PEFT LoRA adapter (loads with peft.PeftModel.from_pretrained)."""
    setup_torch(None)
    from sharecl.interop.peft import export_task
    from sharecl.store import load_store

    method = load_store(store)
    from sharecl.methods.registry import methods_where

    if not method.exports_peft:
        raise ValueError(f"{store} holds method {method.name!r}; export writes tasks of {', '.join(methods_where(exports_peft=True))} "
                         "stores as PEFT adapters")
    path = export_task(method, task, out)
    console.print(f"wrote PEFT LoRA adapter for [bold]{task}[/] (rank {method.config.p}) to {path}")


@user_errors
def compact(store: Annotated[Path, typer.Argument(help="Store directory.")]):
    """Fold a Share store's appended log files into one new checkpoint (a new version; every
    prediction stays bit-for-bit the same). Writes happen without it: the log is folded on its
    own once it would outgrow the checkpoint; this makes the next load read one file."""
    setup_torch(None)
    from sharecl.store import load_store, read_manifest, save_store, store_lock

    with store_lock(store):
        before = read_manifest(store)
        if not before["files"].get("log") and before.get("format_version") == 2:
            console.print(f"{store}: nothing to fold (version {before['version']} is a checkpoint)")
            return
        manifest = save_store(load_store(store), store, compact=True)
    console.print(f"{store}: {len(before['files'].get('log', []))} log file(s) folded into a checkpoint of "
                  f"{manifest['files']['state']['bytes']:,} bytes; store version {manifest['version']}")


@user_errors
def info(store: Annotated[Path, typer.Argument(help="Store directory.")]):
    """Describe a store: base model, config, tasks, sizes, last merge drift."""
    from sharecl.store import read_manifest, store_class_statistics, store_records

    m = read_manifest(store)
    tasks, merges = store_records(store, m)
    stats = store_class_statistics(store, m)
    console.print(f"[bold]{store}[/]  version {m['version']}  method {m['method']}  base {m['base_model']['path']} "
                  f"(sha256 {m['base_model']['sha256'][:12]}…)  tasks: {_KIND_WORDS.get(m.get('modality') or 'text')}")
    tok = m["base_model"].get("tokenizer")
    if tok:
        console.print(f"tokenizer sha256 {tok['tokenizer_sha256'][:12]}…, chat template "
                      + (f"sha256 {tok['chat_template_sha256'][:12]}…" if tok.get("chat") else "not used"))
    console.print("config: " + ", ".join(f"{k}={v}" for k, v in m["config"].items()))
    t = Table(title=f"{len(tasks)} task(s)")
    for col in ("task", "kind", "classes", "class statistics (--align)"):
        t.add_column(col)
    for task in tasks:
        t.add_row(task["name"], task["kind"], ", ".join(task["classes"]) or "-", stats.get(task["name"], "-"))
    console.print(t)
    if stats:
        console.print("classifier alignment: on — every `learn` on this store aligns the heads (the rank of the newest "
                      "task's statistics is kept)")
    size = sum(f.stat().st_size for f in Path(store).iterdir() if f.is_file())
    log = m["files"].get("log", [])
    console.print(f"on disk: {size:,} bytes" + (f" (a checkpoint and {len(log)} appended log file(s))" if log else ""))
    if merges:
        last = merges[-1]
        console.print(f"last merge (after {last['after_task']}): k per side {last['k'][0]}, largest old-task drift "
                      f"{100 * last.get('drift_max', 0.0):.3f}%")
        cuts = [(r["after_task"], r["new_task"]["truncation_max"]) for r in merges if "new_task" in r]
        if cuts:
            name, cut = max(cuts, key=lambda c: c[1])
            console.print(f"own truncation of a task to p={m['config']['p']} (‖ΔW − ΔW^(p)‖/‖ΔW‖, worst layer): "
                          f"largest {100 * cut:.2f}% ({name})")


