"""The benchmark tables of the docs site (speed, memory, serving, faults, adapter folds), each a
function of one JSON file under ``benchmarks/results/`` written by a ``bench_*.py`` script.

Registered in :data:`results_tables.TABLES` on import (``results_pages.py`` imports this module);
every table ends with the line naming its file, the command that wrote it and the machine.
"""

from __future__ import annotations

import statistics

from _common import RESULTS
from results_tables import label, load, machine, md, num, table


def bench_source(rel: str, command: str) -> str:
    return f"Source: `benchmarks/results/{rel}` (`{command}`; {machine(load(rel).get('environment'))})."


def x(v: float | None, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}×"


def secs(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def adapters_table(rel: str, command: str) -> str:
    """Folding trained LoRAs without data: Share beside lorashare and vlora-dev (``bench_adapters.py``)."""
    d = load(rel)
    header = ["after the last fold", "k", "numbers stored", "score retained (folded ÷ original)", "predictions equal to the original's",
              "ΔW rel. error", "add the 10th / 100th / 1000th adapter (s)"]
    body = [[r["method"], r["k"], num(r["stored_numbers"]), f"{r['retention']:.3f}", f"{r['agreement']:.3f}", f"{r['dW_rel_error']:.3f}",
             " / ".join(secs(r.get(f"add_s@{n}")) for n in (10, 100, 1000))] for r in d["summary"]]
    return md(header, body) + f"\n\n{d['config']['tasks']} adapters. " + bench_source(rel, command)


@table("adapters-trained-head")
def _adapters() -> str:
    return adapters_table("adapters.json", "python benchmarks/bench_adapters.py")


@table("adapters-frozen-head")
def _adapters_frozen() -> str:
    return adapters_table("adapters-frozen-head.json", "python benchmarks/bench_adapters.py --head frozen --out adapters-frozen-head")


@table("adapters-timing")
def _adapters_timing() -> str:
    d = load("adapters-timing.json")
    body = [[r["method"]] + [(x(r[f"add_s@{n}"], 1) if "÷" in r["method"] else secs(r[f"add_s@{n}"])) for n in (10, 100, 1000)]
            for r in d["rows"]]
    return md(["add the n-th adapter (s)", "n = 10", "n = 100", "n = 1,000"], body) + "\n\n" + bench_source(
        "adapters-timing.json", "python benchmarks/bench_adapters.py --timing-only")


LM_ADAPTERS_COMMAND = "python benchmarks/bench_lm_adapters.py --tasks 50 --k 24 --p 4 --eval-every 10"


def _ratio(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


LEARNED = 0.2  # a task its own LoRA clearly learned (24 test prompts: 0.05 is one or two right answers)


def _lm_adapter_row(d: dict, r: dict, orig: dict[str, float]) -> list:
    """One method's row after the last fold; retention on the well-learned tasks computed from its per-task scores."""
    per = d["curves"][r["method"]][-1]["per_task"]
    good = [t for t in per if orig[t] >= LEARNED]
    kept = sum(per[t]["score"] / orig[t] for t in good) / len(good)
    return [r["method"], r["k"], f"{num(r['stored_numbers'])} ({100 * r['bytes_vs_loras']:.1f} %)", _ratio(r["retention"]),
            f"{kept:.3f} (median {statistics.median(per[t]['score'] / orig[t] for t in good):.3f})",
            f"{r['worst_task']} ({_ratio(r['worst'])})" if r.get("worst_task") else "—", _ratio(r["gain_kept"]),
            f"{r['dW_rel_error']:.3f}", secs(r["add_s_last"])]


LM_ADAPTERS_BATCHES = "lm-adapters-batches.json"
LM_ADAPTERS_BATCHES_COMMAND = ("python benchmarks/bench_lm_adapters.py --tasks 50 --k 24 --p 4 --eval-every 50 --methods share-batches "
                               "--batch-size-fold 10 --reuse-scores results/lm-adapters.json --out lm-adapters-batches")


@table("lm-adapters")
def _lm_adapters() -> str:
    """Fifty PEFT LoRAs of SmolLM2 folded without data (``bench_lm_adapters.py``): one row per method,
    after the last fold, and Share's batch-arrival row when ``lm-adapters-batches.json`` exists."""
    d = load("lm-adapters.json")
    c = d["config"]
    orig = {a["task"]: a["original"] for a in d["adapters"]}
    header = ["after the last fold", "k", "numbers stored (÷ the LoRAs')", "score retained, tasks ≥ 0.05", f"score retained, tasks ≥ {LEARNED}",
              "worst task (ratio)", "gain over zero-shot kept", "ΔW rel. error", "add the last adapter (s)"]
    body = [_lm_adapter_row(d, r, orig) for r in d["summary"]]
    batches = ""
    if (RESULTS / LM_ADAPTERS_BATCHES).exists():
        b = load(LM_ADAPTERS_BATCHES)
        body += [_lm_adapter_row(b, r, orig) for r in b["summary"]]
        batches = (f" Batch arrival (the paper's protocol): {b['config']['batch_size_fold']} adapters at a time, one truncation "
                   f"per batch (`ShareMethod.add_adapters`); its add time is the whole batch's. "
                   + bench_source(LM_ADAPTERS_BATCHES, LM_ADAPTERS_BATCHES_COMMAND))
    n05 = sum(v >= 0.05 for v in orig.values())
    n_good = sum(v >= LEARNED for v in orig.values())
    mean = sum(orig.values()) / len(orig)
    zero = sum(a["zero_shot"] for a in d["adapters"]) / len(d["adapters"])
    return (md(header, body) + f"\n\n{c['tasks']} rank-{c['rank']} LoRAs ({num(c['lora_numbers'])} numbers), mean score {mean:.3f} "
            f"with their own LoRA and {zero:.3f} zero-shot; score retained = mean over tasks of folded ÷ original, over the {n05} "
            f"tasks whose own LoRA scores ≥ 0.05 and the {n_good} that score ≥ {LEARNED}. " + bench_source("lm-adapters.json", LM_ADAPTERS_COMMAND)
            + batches)


@table("lm-adapters-per-task")
def _lm_adapters_per_task() -> str:
    """Every task's score (exact match or ROUGE-L, in [0, 1]) zero-shot, with its own LoRA and after the last fold."""
    d = load("lm-adapters.json")
    methods = [r["method"] for r in d["summary"]]
    finals = {m: d["curves"][m][-1].get("per_task", {}) for m in methods}
    body = [[a["task"], a["metric"], f"{a['zero_shot']:.2f}", f"{a['original']:.2f}"]
            + [f"{finals[m][a['task']]['score']:.2f}" if a["task"] in finals[m] else "—" for m in methods]
            + [f"{a['train_s']:.0f}"] for a in d["adapters"]]
    return md(["task", "metric", "zero-shot", "own LoRA", *[f"folded: {m}" for m in methods], "LoRA training (s)"], body) + (
        "\n\n" + bench_source("lm-adapters.json", LM_ADAPTERS_COMMAND))


@table("speed-train-step")
def _train_step() -> str:
    d = load("train_step.json")
    body = [[r["method"], secs(r["median_s"]), secs(r["min_s"]), x(r["ratio_to_peft"])] for r in d["rows"]]
    return (md(["MiniLM training step", "median (s)", "min (s)", "÷ PEFT LoRA (target ≤ 1.15×)"], body)
            + f"\n\nBatch {d['batch_size']} × {d['max_length']} tokens, k = {d['k']}, p = {d['p']}, median of {d['steps']} interleaved steps. "
            + bench_source("train_step.json", "python benchmarks/bench_train_step.py"))


@table("speed-method-steps")
def _method_steps() -> str:
    d = load("method_steps.json")
    body = [[label(r["method"]), secs(r["train_step_s"]), x(r["train_ratio_to_peft"]), secs(r["til_forward_s"]), secs(r.get("cil_forward_s"))]
            for r in d["rows"]]
    return (md(["method (task 2, same batch)", "training step (s)", "÷ PEFT LoRA", "forward with the task id (s)",
                "forward without it (s)"], body) + "\n\n" + bench_source("method_steps.json", "python benchmarks/bench_method_steps.py"))


@table("speed-merge")
def _merge() -> str:
    d = load("merge.json")
    body = [[num(r["tasks"]), secs(r["share_s"]), secs(r["ready_s"]), secs(r["small_space_s"]), secs(r["naive_s"]), x(r["speedup"], 0)]
            for r in d["rows"]]
    return (md(["tasks", "merge as ShareMethod runs it (s)", "incl. materialising coefficients (s)", "small-space merge, from scratch (s)",
                "naive stacked SVD (s)", "speed-up"], body)
            + f"\n\n{d['layers']} layers of {d['d']}×{d['d']}, k = {d['k']}, p = {d['p']}. "
            + bench_source("merge.json", "python benchmarks/bench_merge.py"))


@table("speed-store-scale")
def _store_scale() -> str:
    rel = "store_scale-k32-p4.json"
    d = load(rel)
    body = [[num(r["n"]), secs(r["add_s_median"]), secs(r["merge_s_median"]), num(r["bytes_per_append"]), f"{r['checkpoint_mb']:.1f} MB",
             secs(r["load_s"], 2), f"{r['load_peak_rss_mb']:.0f} MB", "yes" if r["reload_bitwise_equal"] else "**no**"] for r in d["summary"]]
    return (md(["tasks n", "add one task (merge + durable write, s)", "of which merge (s)", "bytes written per add", "checkpoint",
                "load the store (s)", "peak RSS of the load", "reload bit-exact"], body)
            + "\n\n" + bench_source(rel, f"python benchmarks/bench_store_scale.py --k {d['k']} --p {d['p']}"))


@table("speed-ddp")
def _ddp() -> str:
    d = load("ddp.json")
    body = [[label(r["method"]), r["config"], secs(r["learn_s"], 1), x(r["learn_speedup_vs_1x2"]), f"{100 * r['accuracy']:.1f}"] for r in d["rows"]]
    return md(["method", "set-up", "learning (s)", "speed vs 1 process × 2 threads", "accuracy %"], body) + "\n\n" + bench_source(
        "ddp.json", "python benchmarks/bench_ddp.py")


@table("speed-images")
def _images() -> str:
    d = load("images.json")
    body = [[label(r["method"]), f"{r['train_images_per_s']:.0f}", f"{r['infer_images_per_s']:.0f}"] for r in d["methods"]]
    pipe = [[r["what"], f"{r['images_per_s']:,.0f}"] for r in d["pipeline"]]
    return (md(["method on the packaged ViT", "training images / s", "inference images / s"], body) + "\n\n"
            + md(["image pipeline", "images / s"], pipe) + f"\n\n{d['size']} × {d['size']} pixels. "
            + bench_source("images.json", "python benchmarks/bench_images.py"))


def lm_step_table(rel: str, command: str) -> str:
    """Causal-LM training step and generation speed of every method against PEFT LoRA (``bench_lm.py``)."""
    d = load(rel)
    body = [[label(r["method"]), secs(r["train_step_s"], 1), x(r["ratio_to_peft"])] for r in d["train"]]
    gen = [[r["setting"], f"{r['tokens_per_s']:.1f}", x(r["ratio_to_base"])] for r in d["generation"]]
    targets = d["targets"] if isinstance(d["targets"], str) else ", ".join(d["targets"])
    sc = d.get("share_config", {})
    share = f"Share k {sc['k']}, p {sc['p']}, φ {sc['phi']}; " if sc.get("k") is not None else ""
    return (md(["method", "training step (s)", "÷ PEFT LoRA"], body) + "\n\n" + md(["generation", "tokens / s", "÷ base"], gen)
            + f"\n\n{d['model']}, batch {d['batch']} × {d['tokens']} tokens, targets {targets}, rank {d['rank']}, {share}"
            f"precision {d.get('precision', 'fp32')}. " + bench_source(rel, command))


@table("lm-train-step")
def _lm_step() -> str:
    return lm_step_table("lm.json", "python benchmarks/bench_lm.py --rounds 5")


@table("lm-train-step-all-linear")
def _lm_step_all_linear() -> str:
    return lm_step_table("lm-all-linear.json", "python benchmarks/bench_lm.py --targets all-linear --precision bf16 --share-option p=2 "
                                               "--threads 1 --rounds 5 --out lm-all-linear")


@table("serve-throughput")
def _serve() -> str:
    d = load("serve.json")
    t = {(r["backend"], r["tasks"], r["load"]): r for r in d["throughput"]}
    body = []
    for n in sorted({r["tasks"] for r in d["throughput"]}):
        for load_ in ("single", "mixed"):
            s, p = t[("share", n, load_)], t[("peft", n, load_)]
            cell = lambda r: f"{r['requests_per_s']:.1f} ({r['p50_ms']:.0f} / {r['p99_ms']:.0f})"  # noqa: E731
            body.append([n, f"{load_} task{'s' if load_ == 'mixed' else ''}", cell(s), cell(p),
                         x(s["vs_own_single"]) if load_ == "mixed" else "", x(s["requests_per_s"] / p["requests_per_s"]) if load_ == "mixed" else ""])
    sizes = [[r["tasks"], f"{r['share_store_bytes'] / 1e6:.2f} MB", f"{r['peft_bytes'] / 1e6:.2f} MB ({r['ratio_peft_over_share']:.1f}×)",
              f"{r['add_task_s']:.3f} s + {r['save_s']:.3f} s"] for r in d["store_size"]]
    return (md(["tasks", "load", "Share req/s (p50 / p99 ms)", "PEFT req/s (p50 / p99 ms)", "Share mixed ÷ Share single (target ≥ 0.8)",
                "Share mixed ÷ PEFT mixed"], body) + "\n\n"
            + md(["tasks", "Share store", "the same tasks as PEFT LoRA adapters", "add the n-th task (merge + atomic write)"], sizes)
            + f"\n\n{d['clients']} closed-loop clients, {d['requests']} requests of {d['rows_per_request']} rows per cell. "
            + bench_source("serve.json", "python benchmarks/bench_serve.py"))


def generate_decode_table(rel: str, command: str) -> str:
    """Decoding tokens/s per backend and load (``bench_generate.py``, part 1)."""
    d = load(rel)
    cells = {(r["backend"], r["tasks"], r["load"]): r for r in d["decode"]}
    body = []
    for n in sorted({r["tasks"] for r in d["decode"]}):
        c = lambda b, lo, n=n: cells[(b, n, lo)]  # noqa: E731
        f = lambda r: f"{r['tokens_per_s']:.1f} ({r['over_base']:.2f}×)"  # noqa: E731
        sm, s1, pm_ = c("share", "mixed"), c("share", "single"), c("peft", "mixed")
        body.append([n, f"{c('base', '-')['tokens_per_s']:.1f}", f(c("share-folded", "single")), f(s1), f(sm), f(c("peft", "single")), f(pm_),
                     x(sm["tokens_per_s"] / s1["tokens_per_s"]), x(sm["tokens_per_s"] / pm_["tokens_per_s"])])
    return (md(["tasks", "base", "Share folded", "Share, one task", "Share, mixed", "PEFT, one task", "PEFT, mixed",
                "Share mixed ÷ Share one task (target ≥ 0.9)", "Share mixed ÷ PEFT mixed (target ≥ 1.5 at 50)"], body)
            + f"\n\nGenerated tokens/s (× the base model's time), {d['rows']} prompts, {d['new_tokens']} new tokens, precision {d['precision']}; "
            f"tasks: {d['tasks']}. "
            + bench_source(rel, command.format(**d)))


def generate_http_table(rel: str, command: str, per_request: bool = False) -> str:
    """``sharecl serve`` tokens/s and latency per backend and load (``bench_generate.py``, part 2);
    ``per_request``: also requests/s and tokens per request (trained tasks stop at their own length)."""
    d = load(rel)
    cells = {(r["backend"], r["tasks"], r["load"]): r for r in d["http"]}
    body = []
    for n in sorted({r["tasks"] for r in d["http"]}):
        f = lambda r: (f"{r['tokens_per_s']:.1f} ({r['p50_ms'] / 1000:.1f} / {r['p99_ms'] / 1000:.1f} s)"  # noqa: E731
                       + (f"; {r['requests_per_s']:.2f} req/s, {r['tokens'] / r['requests']:.1f} tokens each" if per_request else ""))
        s1, sm, p1, pm_ = (cells[(b, n, lo)] for b, lo in (("share", "single"), ("share", "mixed"), ("peft", "single"), ("peft", "mixed")))
        body.append([n, f(s1), f(sm), f(p1), f(pm_), x(sm["tokens_per_s"] / s1["tokens_per_s"]), x(sm["tokens_per_s"] / pm_["tokens_per_s"])])
    return (md(["tasks", "Share, one task", "Share, mixed", "PEFT, one task", "PEFT, mixed", "Share mixed ÷ Share one task",
                "Share mixed ÷ PEFT mixed"], body)
            + f"\n\n`sharecl serve` over loopback, {d['clients']} closed-loop clients, {d['http_new_tokens']} new tokens, {d['requests']} "
            "requests per cell; generated tokens/s (p50 / p99 latency). " + bench_source(rel, command.format(**d)))


@table("generate-decode")
def _generate_decode() -> str:
    return generate_decode_table("generate-fp32.json", "python benchmarks/bench_generate.py --threads {threads} --rows {rows}")


@table("generate-http")
def _generate_http() -> str:
    return generate_http_table("generate-fp32.json", "python benchmarks/bench_generate.py")


LM_SERVE_COMMAND = ("python benchmarks/bench_generate.py --threads 1 --rows 16 --store WORKDIR/share-store-k24-p4-n50 "
                    "--peft-adapters WORKDIR --out generate-lm-adapters")


@table("generate-lm-adapters-decode")
def _generate_lm_adapters_decode() -> str:
    return generate_decode_table("generate-lm-adapters.json", LM_SERVE_COMMAND)


@table("generate-lm-adapters-http")
def _generate_lm_adapters_http() -> str:
    return generate_http_table("generate-lm-adapters.json", LM_SERVE_COMMAND, per_request=True)


@table("faults")
def _faults() -> str:
    d = load("faults.json")
    k = d["kills"]
    body = [[f"SIGKILL of `sharecl learn` at random instants, {len(k['by_method'])} storable methods", k["kills"], k["unloadable"],
             k["tasks_lost"], "", "", ""]]
    for name, srv in (("text store (MiniLM)", d["text_server"]), ("vision store (packaged DINOv2)", d["vision_server"])):
        body.append([f"fuzzed requests to `sharecl serve`, {name}", num(srv["requests"]), "", "", srv["5xx"], srv["connection_errors"],
                     f"{srv['peak_rss_mb']:.0f} MB"])
    return md(["part", "count", "unloadable stores", "tasks lost", "5xx", "connection errors", "peak server RSS"], body) + "\n\n" + bench_source(
        "faults.json", "python benchmarks/bench_faults.py " + " ".join(f"--{k} {d['args'][k]}" for k in ("kills", "requests", "steps")))


@table("vit-stability")
def _vit() -> str:
    d = load("vit_stability.json")
    body = [[f"{r['train_per_class']}, {r['steps']}", f"{r['lr']:g}", r["variant"], f"{r['last10_mean']:.3f}", r["TIL"], r["CIL prototype"]]
            for r in d["rows"]]
    header = ["images/class, steps", "lr", "variant", "last-10-step mean loss (task 1)", "TIL task 1 / 2", "CIL task 1 / 2"]
    return md(header, body) + "\n\n" + bench_source(
        "vit_stability.json", "python benchmarks/bench_vit_stability.py")


