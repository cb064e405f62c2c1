"""gen5: final score against adapter bytes per task (log x), on the validation split, seed 0.

Share's settings (the rows of ``results/share_lm_ablation.json`` at the chosen learning-rate
scheme, whose bytes differ by p and k) form a curve; each other method is a point at its best
validation score over the learning-rate trials of a ``--tune-lr`` comparison (``tune/lr-*/``),
LoRA per task included. Where a Share setting needs more bytes to reach LoRA per task, the curve
shows where. Nothing is trained.

    python benchmarks/plot_gen5_bytes.py [--compare compare-gen5-tuned] [--share-prefix r10]
        [--extra "compare-gen5-all-linear:, all linear"]

Writes ``results/gen5_score_bytes.png`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json

from _common import METHOD_LABELS, RESULTS, write


def trial_points(folder: str, suffix: str = "") -> list[dict]:
    """One point per method but Share: its best validation score over the AdamW trials under
    ``results/<folder>/tune/lr-*/`` and that trial's bytes per task (``suffix`` added to the label)."""
    best: dict[str, dict] = {}
    for f in sorted((RESULTS / folder / "tune").glob("lr-*/*/results.json")):
        m, lr = f.parent.name, f.parent.parent.name.removeprefix("lr-")
        if m == "share" or "-" in lr:  # Share is the curve; lr-X-sgd is an SGD trial
            continue
        r = json.loads(f.read_text())
        p = {"label": METHOD_LABELS.get(m, m) + suffix, "bytes": r["bytes_per_task"], "score": 100 * r["final_average_accuracy"],
             "method": m, "lr": float(lr)}
        if m not in best or p["score"] > best[m]["score"]:
            best[m] = p
    return list(best.values())


def points(compare: str, prefix: str, extra: list[tuple[str, str]] = ()) -> tuple[list[dict], list[dict]]:
    """``(share_curve, peers)``: dicts with ``label``, ``bytes``, ``score`` (validation %); ``extra``:
    ``(folder, label suffix)`` of further comparisons whose trials are points too."""
    abl = json.loads((RESULTS / "share_lm_ablation.json").read_text())["rows"]
    share = [{"label": r["trial"], "bytes": r["bytes_per_task"], "score": 100 * r["validation_score"]}
             for r in abl if r["method"] == "share" and (r["trial"].startswith(prefix) or r["trial"] == prefix)]
    peers = trial_points(compare)
    for folder, suffix in extra:
        peers += trial_points(folder, suffix)
    return sorted(share, key=lambda p: p["bytes"]), peers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compare", default="compare-gen5-tuned", help="results/ folder of the --tune-lr comparison")
    ap.add_argument("--share-prefix", default="r10", help="ablation trials whose name starts with this form the Share curve")
    ap.add_argument("--extra", action="append", default=[], metavar="FOLDER:SUFFIX",
                    help="another comparison's validation trials as points, labels ending in SUFFIX (repeatable)")
    a = ap.parse_args()
    extra = [tuple(e.split(":", 1)) for e in a.extra]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    share, peers = points(a.compare, a.share_prefix, extra)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if share:
        ax.plot([p["bytes"] for p in share], [p["score"] for p in share], "o-", color="C0", label="Share (settings)")
        for p in share:
            ax.annotate(p["label"], (p["bytes"], p["score"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for i, p in enumerate(peers):
        ax.plot([p["bytes"]], [p["score"]], "s", color=f"C{i + 1}", label=p["label"])
    lora = next((p for p in peers if p.get("method") == "lora-per-task" and p["label"] == METHOD_LABELS.get("lora-per-task")), None)
    if lora:
        ax.axhline(lora["score"], color="grey", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("adapter bytes per task (float32, log scale)")
    ax.set_ylabel("gen5 validation score % (seed 0)")
    ax.set_title("gen5 on SmolLM2-135M: score against bytes per task")
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    out = RESULTS / "gen5_score_bytes.png"
    fig.savefig(out, dpi=120)
    print("written:", out, write("gen5_score_bytes", {"compare": a.compare, "share_prefix": a.share_prefix, "extra": a.extra, "share": share,
                                                    "peers": peers}))


if __name__ == "__main__":
    main()
