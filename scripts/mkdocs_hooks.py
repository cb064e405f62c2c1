"""MkDocs hook: publish the plots under ``benchmarks/results/`` with the docs site (as
``benchmarks/results/...``), so results pages show the committed figures without copies in ``docs/``."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent


def on_files(files, config):
    results = ROOT / "benchmarks" / "results"
    for png in sorted(results.rglob("*.png")):
        rel = png.relative_to(ROOT).as_posix()
        if "/store/" in rel or files.get_file_from_path(rel) is not None:
            continue
        files.append(File(rel, src_dir=str(ROOT), dest_dir=config["site_dir"], use_directory_urls=config["use_directory_urls"]))
    return files
