"""The results tables of the README and the docs site, each a function of the committed JSON
under ``benchmarks/results/`` (:func:`results_pages.main` writes them into the pages).

Helpers read ``sharecl compare`` folders (``compare.json`` and each seed's ``manifest.json`` and
``results.json``) and benchmark JSON files; every table ends with a line naming its source
folder or file, the command that made it (for a comparison: rebuilt from its manifests) and the
machine it ran on (from the recorded environment).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache

from _common import METHOD_LABELS, RESULTS, pct_pm

TABLES: dict[str, Callable[[], str]] = {}


def table(name: str):
    """Register a table function under ``name`` (the marker's name in the pages)."""
    def deco(fn):
        TABLES[name] = fn
        return fn
    return deco


# ----------------------------------------------------------------------------- reading
@cache
def load(rel: str) -> dict:
    """A JSON file under ``benchmarks/results/``."""
    return json.loads((RESULTS / rel).read_text())


def compare_json(folder: str) -> dict:
    """A comparison's ``compare.json``; ``"FOLDER@NAME"`` reads ``FOLDER/NAME.json`` instead (a report
    over some of the folder's methods and seeds, as ``compare-3seeds-share-lora-per-task.json``)."""
    base, _, name = folder.partition("@")
    return load(f"{base}/{name or 'compare'}.json")


def run(folder: str, seed: int, method: str) -> dict:
    return load(f"{folder.partition('@')[0]}/seed-{seed}/{method}/results.json")


# ---------------------------------------------------------------------------- formats
def pm(stat: dict | None) -> str:
    """mean ± std in % of fractions; "—" when missing."""
    return pct_pm(stat)


def signed_pm(stat: dict | None) -> str:
    """As :func:`pm` with a typographic minus (BWT)."""
    return pm(stat).replace("-", "−")


def pm_seeds(stat: dict | None, n: int, signed: bool = False) -> str:
    """:func:`pm` (or :func:`signed_pm`) for a row over ``n`` seeds, without the "± 0.00" of a
    single seed (one run has no spread)."""
    s = signed_pm(stat) if signed else pm(stat)
    return s.partition(" ± ")[0] if n == 1 else s


def num(x: float | int | None) -> str:
    return "—" if x is None else f"{x:,.0f}"


def pct_of(x: float, ref: float) -> str:
    """``x`` as a percentage of ``ref``: two decimals under 10 %, none above."""
    v = 100 * x / ref
    return f"{v:.2f} %" if v < 10 else f"{v:.0f} %"


def mean(stat) -> float | None:
    return stat.get("mean") if isinstance(stat, dict) else stat


def md(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def machine(env: dict | None) -> str:
    """``AMD EPYC (AVX512, mkl), 1 thread`` from a recorded environment."""
    if not env or not env.get("cpu"):
        return "machine not recorded"
    threads = env.get("threads")
    return (f"{env.get('cpu', '?')} ({env.get('cpu_capability', '?')}), {threads} thread{'s' if threads != 1 else ''}"
            + (f", CUDA {env['cuda']}" if env.get("cuda") else ""))


def _fmt_lr(x: float) -> str:
    return f"{x:g}"


def compare_command(folder: str) -> str:
    """The ``sharecl compare`` command a folder's runs correspond to, rebuilt from its manifests and
    ``compare.json`` (stream, methods, seeds, budget, rate or tuning grid, precision)."""
    c = compare_json(folder)
    seeds = sorted({s for m in c["methods"].values() for s in m["seeds"]})
    m0 = next(iter(c["methods"]))
    first = run(folder, c["methods"][m0]["seeds"][0], m0)  # every run records its budget and precision
    tc = first["train_config"]
    parts = [f"sharecl compare --stream {c['stream']} --methods {','.join(c['methods'])} --seeds {','.join(map(str, seeds))}",
             f"--steps {tc['steps']} --batch-size {tc['batch_size']}"]
    tuned = c.get("tuned_lr")
    if tuned:
        grid = sorted({float(k.split()[0]) for t in tuned.values() for k in t["validation_final_accuracy"] if " " not in k})
        sgd = sorted({float(k.split()[0]) for t in tuned.values() for k in t["validation_final_accuracy"] if k.endswith("sgd")})
        parts.append(f"--tune-lr {','.join(map(_fmt_lr, grid))}" + (f" --tune-sgd-lr {','.join(map(_fmt_lr, sgd))}" if sgd else ""))
    elif c.get("method_lr"):
        parts += [f"--method-lr {m}={_fmt_lr(lr)}" for m, lr in c["method_lr"].items()]
        rest = [m for m in c["methods"] if m not in c["method_lr"]]
        if rest:  # the others ran at --lr
            parts.append(f"--lr {_fmt_lr(run(folder, c['methods'][rest[0]]['seeds'][0], rest[0])['train_config']['lr'])}")
    else:
        parts.append(f"--lr {_fmt_lr(tc['lr'])}")
    lm = "metrics" in first  # a generation stream: Share's default layers there are all linear ones
    for m in c["methods"]:
        cfg = run(folder, c["methods"][m]["seeds"][0], m).get("config", {})
        if lm and m == "share" and isinstance(cfg.get("target_modules"), list):  # not the default: name them for every method
            parts.append(f"--target-modules {','.join(cfg['target_modules'])}")
        if lm and m == "share" and "coeff_lr_ratio" not in cfg:  # a run from before the option: one rate for all
            parts.append(f"--set {m}.coeff_lr_ratio=1.0")
        if m in ("share", "share-full") and cfg.get("k") is not None:
            parts.append(f"--k {cfg['k']} --p {cfg['p']}")
        for key in ("lr", "coeff_lr_ratio", "orthogonal"):
            default_ratio = 10.0 if lm else 1.0  # SHARE_DEFAULTS' coeff_lr_ratio per family
            if cfg.get(key) is not None and not (key == "coeff_lr_ratio" and cfg[key] == default_ratio) and not (key == "orthogonal" and cfg[key]):
                parts.append(f"--set {m}.{key}={cfg[key]}")
        if isinstance(cfg.get("target_modules"), str):  # "all-linear" (a list is the family default's resolution, but Share's on an LM)
            parts.append(f"--set {m}.target_modules={cfg['target_modules']}")
    if tc.get("align"):
        parts.append("--align" + (f" --align-rank {tc['align_rank']}" if tc.get("align_rank") else ""))
    if first.get("precision", "fp32") != "fp32":
        parts.append(f"--precision {first['precision']}")
    return " ".join(parts)


def compare_source(*folders: str) -> str:
    """The line under a comparison table: folders, commands and machines."""
    out = []
    for f in dict.fromkeys(folders):
        c = compare_json(f)
        m0 = next(iter(c["methods"]))
        env = run(f, c["methods"][m0]["seeds"][0], m0).get("environment")
        base, _, name = f.partition("@")
        where = f"`benchmarks/results/{base}/`" + (f" (`{name}.json`)" if name else "")
        out.append(f"{where} (`{compare_command(f)}`; {machine(env)})")
    return "Source: " + "; ".join(out) + "."


# -------------------------------------------------------------------------- comparisons
def compare_table(rows: list[tuple[str, str, str]], *, kind: str | None = None, lora_ref: tuple[str, str] | None = None,
                  seed: int | None = None) -> str:
    """A comparison table, one row per ``(label, folder, method)``: mean ± sample std over the
    folder's seeds, or one ``seed``'s values. ``kind``: "til", "cil" or "lm" (default: from the
    first folder). ``lora_ref`` ``(folder, method)``: adds "% of LoRA" to the adapter bytes."""
    first = compare_json(rows[0][1])
    kind = kind or ("lm" if first["stream"].startswith("gen") else first["scenario"])
    ref = mean(compare_json(lora_ref[0])["methods"][lora_ref[1]]["bytes_per_task"]) if lora_ref else None
    if seed is not None:
        return _seed_table(rows, kind, ref, seed)
    if kind == "cil":
        header = ["method", "final CIL acc %", "avg incr CIL %", "CIL forgetting", "TIL final acc %", "adapter bytes / task", "seeds"]
    elif kind == "lm":
        header = ["method", "final score %", "avg incr %", "forgetting", "BWT", "FWT %", "bytes / task", "bytes shared", "seeds"]
    else:
        header = ["method", "final avg acc %", "avg incr acc %", "forgetting", "BWT", "trainable / task", "adapter bytes / task",
                  "bytes stored once", "seeds"]
    body = []
    for label, folder, method in rows:
        r = compare_json(folder)["methods"][method]
        b = mean(r["bytes_per_task"])
        bytes_ = num(b) + (f" ({pct_of(b, ref)} of LoRA)" if ref and b and method != "lora-per-task" else "")
        seeds = ", ".join(map(str, r["seeds"]))
        n = len(r["seeds"])
        final, incr, forg = (pm_seeds(r[k], n) for k in ("final_average_accuracy", "average_incremental_accuracy", "forgetting"))
        if kind == "cil":
            body.append([label, final, incr, forg, pm_seeds(r.get("til_final_average_accuracy"), n), bytes_, seeds])
        elif kind == "lm":
            body.append([label, final, incr, forg, pm_seeds(r["bwt"], n, signed=True), pm_seeds(r.get("fwt"), n), bytes_,
                         num(mean(r["bytes_shared"])), seeds])
        else:
            body.append([label, final, incr, forg, pm_seeds(r["bwt"], n, signed=True), num(mean(r["trainable_params_last_task"])),
                         bytes_, num(mean(r["bytes_shared"])), seeds])
    return md(header, body) + "\n\n" + compare_source(*(f for _, f, _ in rows))


def label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def all_rows(folder: str, labels: dict[str, str] | None = None) -> list[tuple[str, str, str]]:
    return [((labels or {}).get(m, label(m)), folder, m) for m in compare_json(folder)["methods"]]


def tuned_table(tuned: str, *untuned: str) -> str:
    """The tuned-on-validation table of ``tuned_table.py`` (the rate chosen, its grid, tuned and untuned test)."""
    import tuned_table as tt

    scenario = compare_json(tuned)["scenario"]
    return tt.markdown(tt.rows(tuned, list(untuned)), scenario) + "\n\n" + compare_source(tuned, *untuned)


# ------------------------------------------------------------------------------- pages
@table("text5-untuned")
def _text5_untuned() -> str:
    rows = [("**Share** (k=10, p=2), today's code", "compare-text5-share-current", "share"),
            *[r for r in all_rows("compare-text5") if r[2] != "share"],
            ("joint LoRA (not continual), adapter lr 1e-3", "compare-text5-joint-lr1e-3", "joint-lora"),
            ("Share, the release before the seed's full factors", "compare-text5", "share")]
    return compare_table(rows, lora_ref=("compare-text5", "lora-per-task"))


@table("text5-tuned")
def _text5_tuned() -> str:
    return tuned_table("compare-text5-tuned", "compare-text5", "compare-text5-share-current")


def stat(folder: str, method: str, key: str, seed: int | None = None):
    """A compare folder's ``{"mean", "std"}`` of ``key`` for ``method``, or one seed's value (as a mean)."""
    if seed is None:
        return compare_json(folder)["methods"][method].get(key)
    v = run(folder, seed, method).get(key)
    return None if v is None else {"mean": v, "std": 0.0}


def one(s) -> str:
    """A single run's value in % with one decimal (a seed, not a mean)."""
    v = mean(s)
    return "—" if v is None else f"{100 * v:.1f}"


def align_table(rows: list[tuple[str, str, str | None, str]], seed: int | None = None, recompute: str | None = None) -> str:
    """Class-incremental accuracy without and with classifier alignment, one row per
    ``(label, untuned folder, aligned folder or None, method)``; ``seed``: one seed's values instead of
    mean ± std; ``recompute``: a folder of aligned runs whose old statistics were recomputed from data."""
    f = one if seed is not None else pm
    header = ["method", "final CIL without", "**final CIL with alignment**", "avg incr CIL with", "CIL forgetting with",
              "TIL final with", "head bytes / task with"]
    if recompute:
        header.insert(3, "with alignment, old statistics recomputed (not continual)")
    body, folders = [], []
    for label_, untuned, aligned, m in rows:
        folders += [untuned] + ([aligned] if aligned else [])
        r = [label_, f(stat(untuned, m, "final_average_accuracy", seed))]
        if aligned:
            r += [f(stat(aligned, m, "final_average_accuracy", seed)), f(stat(aligned, m, "average_incremental_accuracy", seed)),
                  f(stat(aligned, m, "forgetting", seed)), f(stat(aligned, m, "til_final_average_accuracy", seed)),
                  num(mean(stat(aligned, m, "head_bytes_per_task", seed)))]
        else:
            r += ["—", "—", "—", f(stat(untuned, m, "til_final_average_accuracy", seed)), "—"]
        if recompute:
            has = m in compare_json(recompute)["methods"]
            r.insert(3, f(stat(recompute, m, "final_average_accuracy", seed)) if has else "—")
            if has:
                folders.append(recompute)
        body.append(r)
    note = f" Seed {seed} only." if seed is not None else ""
    return md(header, body) + "\n\n" + compare_source(*folders) + note


def rules_table(rel: str, *, validation: bool) -> str:
    """Share's class-incremental task-identification rules on the same models (``bench_cil_rules.py``)."""
    d = load(rel)
    header = ["task-identification rule (same models)"]
    header += ["final CIL acc %, validation", "task identified, validation"] if validation else []
    header += ["final CIL acc %, test", "task identified, test"] + (["seconds (test)"] if "seconds" in d["summary"][0] else [])
    body = []
    for r in d["summary"]:
        row = [r["score"]] + ([f"{r['final_cil_acc_val']:.2f}", f"{r['task_id_acc_val']:.2f}"] if validation else [])
        row += [f"{r['final_cil_acc']:.2f}", f"{r['task_id_acc']:.2f}"] + ([f"{r['seconds']:.1f}"] if "seconds" in r else [])
        body.append(row)
    seeds = ", ".join(map(str, sorted({s["seed"] for s in d.get("per_seed", []) if isinstance(s, dict) and "seed" in s}))) or "0–2"
    return (md(header, body) + f"\n\nSource: `benchmarks/results/{rel}` (`python benchmarks/bench_cil_rules.py`, stream "
            f"{d['stream']}, runs in `{d.get('runs')}`, seeds {seeds}; {machine(d.get('environment'))}).")


# -------------------------------------------------------------------- class-incremental
@table("wordnet-cil-untuned")
def _wordnet_untuned() -> str:
    rows = [("**Share**, prototype task-id score (default)", "compare-wordnet-cil-share-prototype", "share"),
            ("Share, energy task-id score", "compare-wordnet-cil-share-energy", "share"),
            *[r for r in all_rows("compare-wordnet-cil") if r[2] != "share"]]
    return compare_table(rows)


@table("wordnet-cil-rules")
def _wordnet_rules() -> str:
    return rules_table("cil_rules.json", validation=False)


@table("wordnet-cil-tuned")
def _wordnet_tuned() -> str:
    return tuned_table("compare-wordnet-cil-tuned", "compare-wordnet-cil", "compare-wordnet-cil-share-prototype")


@table("wordnet-cil-align")
def _wordnet_align() -> str:
    ms = ["share", "head-only", "inflora", "dual-lora", "sd-lora", "seq-lora"]
    rows = [(label(m), "compare-wordnet-cil-share-prototype" if m == "share" else "compare-wordnet-cil", "compare-wordnet-cil-align", m)
            for m in ms] + [("joint LoRA (ceiling, not continual)", "compare-wordnet-cil", None, "joint-lora")]
    return align_table(rows)


@table("fmnist-cil-untuned")
def _fmnist_untuned() -> str:
    return compare_table(all_rows("compare-fmnist-cil"))


@table("fmnist-cil-rules")
def _fmnist_rules() -> str:
    return rules_table("cil_rules-fmnist-cil.json", validation=False)


@table("fmnist-cil-tuned")
def _fmnist_tuned() -> str:
    return tuned_table("compare-fmnist-cil-tuned", "compare-fmnist-cil")


@table("mnist-cil-untuned")
def _mnist_untuned() -> str:
    return compare_table(all_rows("compare-mnist-cil"))


@table("mnist-cil-tuned")
def _mnist_tuned() -> str:
    return tuned_table("compare-mnist-cil-tuned", "compare-mnist-cil")


@table("mnist-cil-align")
def _mnist_align() -> str:
    ms = ["share", "head-only", "dual-lora", "inflora", "sd-lora", "seq-lora"]
    rows = [(label(m), "compare-mnist-cil", "compare-mnist-cil-share-align" if m == "share" else "compare-mnist-cil-align", m)
            for m in ms] + [("joint LoRA (ceiling, not continual)", "compare-mnist-cil", None, "joint-lora")]
    return align_table(rows)


@table("mnist-cil-top-tasks")
def _mnist_top() -> str:
    return rules_table("cil_rules-mnist-cil-top-tasks.json", validation=True)


@table("mnist-cil-aligned-rules")
def _mnist_aligned_rules() -> str:
    return rules_table("cil_rules-mnist-cil-aligned.json", validation=True)


@table("fmnist-cil-align-seed0")
def _fmnist_align_seed0() -> str:
    ms = ["head-only", "inflora", "dual-lora", "sd-lora", "seq-lora", "share"]
    rows = [(label(m), "compare-fmnist-cil", "compare-fmnist-cil-share-align" if m == "share" else "compare-fmnist-cil-align", m)
            for m in ms] + [("joint LoRA (ceiling)", "compare-fmnist-cil", None, "joint-lora")]
    return align_table(rows, seed=0, recompute="compare-fmnist-cil-align-recompute")


@table("fmnist-cil-align-rank16")
def _fmnist_rank16() -> str:
    rows = [(label(m), "compare-fmnist-cil", "compare-fmnist-cil-align-rank16", m) for m in ("share", "head-only")]
    return align_table(rows, seed=0)


@table("fmnist-cil-mahalanobis")
def _fmnist_mahalanobis() -> str:
    return rules_table("cil_rules-fmnist-cil-mahalanobis.json", validation=True)


@table("fmnist-then-mnist-untuned")
def _ftm_untuned() -> str:
    return compare_table(all_rows("compare-fmnist-then-mnist"), lora_ref=("compare-fmnist-then-mnist", "lora-per-task"))


@table("fmnist-then-mnist-tuned")
def _ftm_tuned() -> str:
    return tuned_table("compare-fmnist-then-mnist-tuned", "compare-fmnist-then-mnist")


@table("fmnist-cil-augment")
def _fmnist_augment() -> str:
    rows = [(label(m), "compare-fmnist-cil", "compare-fmnist-cil-augment", m) for m in ("share", "dual-lora")]
    header = ["method", "final CIL, plain", "final CIL, --augment", "TIL final, plain", "TIL final, --augment"]
    body = [[lab, one(stat(a, m, "final_average_accuracy", 0)), one(stat(b, m, "final_average_accuracy", 0)),
             one(stat(a, m, "til_final_average_accuracy", 0)), one(stat(b, m, "til_final_average_accuracy", 0))] for lab, a, b, m in rows]
    return md(header, body) + "\n\n" + compare_source("compare-fmnist-cil", "compare-fmnist-cil-augment") + " Seed 0 only."


def _seed_table(rows: list[tuple[str, str, str]], kind: str, ref: float | None, seed: int) -> str:
    """:func:`compare_table` for one seed: each run's own values, two decimals."""
    def v(x, signed=False):
        return "—" if x is None else (f"{100 * x:+.2f}".replace("-", "−") if signed else f"{100 * x:.2f}")

    header = (["method", "final CIL acc %", "avg incr CIL %", "CIL forgetting", "TIL final %", "adapter bytes / task"] if kind == "cil"
              else ["method", "final score %", "avg incr %", "forgetting", "BWT", "adapter bytes / task", "bytes stored once"] if kind == "lm"
              else ["method", "final acc %", "avg incr acc %", "forgetting", "BWT", "adapter bytes / task", "bytes stored once"])
    body = []
    for lab, folder, m in rows:
        r = run(folder, seed, m)
        b = r["bytes_per_task"]
        bytes_ = num(b) + (f" ({pct_of(b, ref)} of LoRA)" if ref and b and m != "lora-per-task" else "")
        if kind == "cil":
            body.append([lab, v(r["final_average_accuracy"]), v(r["average_incremental_accuracy"]), v(r["forgetting"]),
                         v(r.get("til_final_average_accuracy")), bytes_])
        else:
            body.append([lab, v(r["final_average_accuracy"]), v(r["average_incremental_accuracy"]), v(r["forgetting"]),
                         v(r["bwt"], signed=True), bytes_, num(r["bytes_shared"])])
    return md(header, body) + "\n\n" + compare_source(*(f for _, f, _ in rows)) + f" Seed {seed}."


# ------------------------------------------------------------------------- long streams
@table("text20-seed0")
def _text20() -> str:
    return compare_table(all_rows("compare-text20"), lora_ref=("compare-text20", "lora-per-task"), seed=0)


@table("text20-share-lora-seeds")
def _text20_seeds() -> str:
    f = "compare-text20@compare-3seeds-share-lora-per-task"
    return compare_table([(label(m), f, m) for m in ("share", "lora-per-task")], lora_ref=(f, "lora-per-task"))


@table("text20-dual-lora-ablation")
def _text20_dual() -> str:
    body = []
    for lab, folder, m in [("DualLoRA with the orthogonal adapter (the method)", "compare-text20", "dual-lora"),
                           ("**DualLoRA without it** (ablation)", "compare-text20-dual-lora-no-orthogonal", "dual-lora"),
                           ("InfLoRA (same memory, designed fixed down-projection)", "compare-text20", "inflora")]:
        r = run(folder, 0, m)
        A = r["accuracy_matrix"]
        diag = sum(A[i][i] for i in range(len(A))) / len(A)
        dims = r.get("memory_dims") or {}
        body.append([lab, f"{100 * r['final_average_accuracy']:.2f}", f"{100 * diag:.2f}", f"{100 * r['forgetting']:.2f}",
                     f"{sum(dims.values()) / len(dims):.1f}" if dims else "—"])
    header = ["text20, seed 0", "final acc %", "mean accuracy on the task just learned %", "forgetting",
              "memory dims at the end (mean per layer, of 384)"]
    return md(header, body) + "\n\n" + compare_source("compare-text20", "compare-text20-dual-lora-no-orthogonal") + " Seed 0."


def curve_table(rel: str, what: str) -> str:
    """Share's accuracy against bytes per task over k and p (``bench_share_curve.py``)."""
    d = load(rel)
    header = ["k", "p", "final acc %", "forgetting", "adapter bytes / task", "% of LoRA", "largest old-task drift at a merge",
              "basis size at the end (B, A)"]
    body = [[r["k"], r["p"], f"{r['final_acc']:.2f}", f"{r['forgetting']:.2f}", num(r["bytes_per_task"]), f"{r['pct_of_lora']:.2f} %",
             f"{r['max_drift_pct']:.2g} %", ", ".join(map(str, r.get("final_k", [])))] for r in d["rows"]]
    return (md(header, body) + f"\n\nSource: `benchmarks/results/{rel}` (`python benchmarks/bench_share_curve.py"
            f"{' --stream ' + d['stream'] if d.get('stream') else ''}`, {what}, seed {d['seed']}, {d['steps']} steps per task; "
            f"{machine(d.get('environment'))}).")


@table("text20-share-curve")
def _text20_curve() -> str:
    return curve_table("share_curve-text20.json", "text20")


@table("text5-share-curve")
def _text5_curve() -> str:
    return curve_table("share_curve.json", "text5")


@table("text20-cil-seed0")
def _text20_cil() -> str:
    rows = [("**Share + alignment** (top 2 tasks per input)", "compare-text20-cil-share-align-top2", "share"),
            *all_rows("compare-text20-cil"),
            ("joint LoRA (not continual), adapter lr 1e-3", "compare-text20-cil-joint-lr1e-3", "joint-lora")]
    return compare_table(rows, seed=0)


@table("images20-seed0")
def _images20() -> str:
    return compare_table(all_rows("compare-images20"), lora_ref=("compare-images20", "lora-per-task"), seed=0)


@table("images20-share-lora-seeds")
def _images20_seeds() -> str:
    f = "compare-images20@compare-3seeds-share-lora-per-task"
    return compare_table([(label(m), f, m) for m in ("share", "lora-per-task")], lora_ref=(f, "lora-per-task"))
