"""Class-incremental results at a glance: final CIL accuracy per stream and method.

Reads the ``compare.json`` files that ``sharecl compare`` wrote under ``results/`` (the
commands are in the README beside each table) and puts three settings side by side for every
continual method — untuned (every method at the stream's one rate, AdamW), learning rate tuned on the
validation split (``--tune-lr``), and classifier alignment (``--align``) — with joint LoRA, the
non-continual ceiling, as a line. Nothing is trained or evaluated here; a setting whose run is
missing is left blank (and named in the JSON's ``missing``).

    python benchmarks/summary_cil.py

Prints a Markdown table (mean ± sample std over seeds, %, and the number of seeds), writes
``results/cil_summary.json`` and ``results/cil_summary.png``.
"""

from __future__ import annotations

import json

from _common import METHOD_LABELS as LABELS
from _common import RESULTS, pct_pm, write

METHODS = ["share", "head-only", "inflora", "dual-lora", "sd-lora", "seq-lora"]
SETTINGS = ["untuned", "tuned", "aligned"]
# stream → setting → result folders, earlier ones first (a later folder's method replaces an earlier one's)
SOURCES = {
    "wordnet-cil": {"untuned": ["compare-wordnet-cil", "compare-wordnet-cil-share-prototype"],
                    "tuned": ["compare-wordnet-cil-tuned"], "aligned": ["compare-wordnet-cil-align"]},
    "fmnist-cil": {"untuned": ["compare-fmnist-cil"], "tuned": ["compare-fmnist-cil-tuned"],
                   "aligned": ["compare-fmnist-cil-align", "compare-fmnist-cil-share-align"]},
    "mnist-cil": {"untuned": ["compare-mnist-cil"], "tuned": ["compare-mnist-cil-tuned"],
                  "aligned": ["compare-mnist-cil-align", "compare-mnist-cil-share-align"]},
}


def _rows(folders: list[str]) -> dict[str, dict]:
    """``{method: {"mean", "std", "seeds"}}`` of final CIL accuracy (fractions) over the folders that exist."""
    out = {}
    for folder in folders:
        f = RESULTS / folder / "compare.json"
        if not f.is_file():
            continue
        for name, m in json.loads(f.read_text())["methods"].items():
            acc = m["final_average_accuracy"]
            out[name] = {"mean": acc["mean"], "std": acc["std"], "seeds": m["seeds"], "from": folder}
    return out


def collect() -> dict:
    """Every stream's table: ``{stream: {setting: {method: row}}}``, plus the settings with no run."""
    streams, missing = {}, []
    for stream, settings in SOURCES.items():
        streams[stream] = {s: _rows(folders) for s, folders in settings.items()}
        missing += [f"{stream} {s}" for s in SETTINGS if not streams[stream][s]]
    return {"streams": streams, "missing": missing}


def _cell(row: dict | None) -> str:
    if not row:
        return "—"
    return f"{pct_pm(row)} ({len(row['seeds'])})"


def markdown(summary: dict) -> str:
    lines = []
    for stream, settings in summary["streams"].items():
        joint = settings["tuned"].get("joint-lora") or settings["untuned"].get("joint-lora")
        lines += [f"\n{stream} (joint LoRA, not continual: {_cell(joint)})\n",
                  "| method | untuned | lr tuned on validation | with alignment |", "|---|---|---|---|"]
        lines += [f"| {LABELS[m]} | " + " | ".join(_cell(settings[s].get(m)) for s in SETTINGS) + " |" for m in METHODS]
    return "\n".join(lines)


def plot(summary: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    streams = summary["streams"]
    fig, axes = plt.subplots(1, len(streams), figsize=(5 * len(streams), 4), sharey=True)
    width, colors = 0.26, {"untuned": "#9e9e9e", "tuned": "#4c78a8", "aligned": "#f58518"}
    for ax, (stream, settings) in zip(axes, streams.items()):
        for j, s in enumerate(SETTINGS):
            xs, ys, es = [], [], []
            for i, m in enumerate(METHODS):
                row = settings[s].get(m)
                if row:
                    xs.append(i + (j - 1) * width)
                    ys.append(100 * row["mean"])
                    es.append(100 * row["std"])
            ax.bar(xs, ys, width, yerr=es, capsize=2, color=colors[s], label={"untuned": "untuned",
                   "tuned": "lr tuned on validation", "aligned": "with alignment"}[s])
        joint = settings["tuned"].get("joint-lora") or settings["untuned"].get("joint-lora")
        if joint:
            ax.axhline(100 * joint["mean"], color="k", ls="--", lw=1, label="joint LoRA, lr tuned (ceiling)")
        ax.set_xticks(range(len(METHODS)), [LABELS[m] for m in METHODS], rotation=30, ha="right")
        ax.set_title(stream)
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("final class-incremental accuracy, %")
    handles, labels = axes[0].get_legend_handles_labels()  # below the panels: the ceiling line can sit anywhere
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle("mean over seeds, bars ± sample std; a missing bar: no run", fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    summary = collect()
    print(markdown(summary))
    if summary["missing"]:
        print("\nno run yet for: " + ", ".join(summary["missing"]))
    path = write("cil_summary", summary)
    plot(summary, RESULTS / "cil_summary.png")
    print(f"\nwritten: {path} and {RESULTS / 'cil_summary.png'}")


if __name__ == "__main__":
    main()
