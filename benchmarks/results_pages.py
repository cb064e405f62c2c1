"""Every results table of the README and the docs site, written from ``benchmarks/results/``.

A page holds a table as a block between markers::

    <!-- generated: text5-untuned -->
    (what this script writes: the table, then a line naming its source, command and machine)
    <!-- /generated -->

The block's name is a key of :data:`TABLES` (``results_tables.py``), a function that reads the
committed JSON and returns Markdown. Nothing is trained or evaluated.

    python benchmarks/results_pages.py           # rewrite every block in README.md and docs/**/*.md
    python benchmarks/results_pages.py --check   # exit 1 (and show a diff) where a page differs

CI runs ``--check`` (``tests/test_docs.py``): a table that no longer matches its results fails.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from pathlib import Path

import results_bench_tables  # noqa: F401  (registers the benchmark tables)
import results_gen5_tables  # noqa: F401  (registers the gen5 tables)
import results_gen30_tables  # noqa: F401  (registers the gen30 tables)
import results_summary  # noqa: F401  (registers the README summary)
from results_tables import TABLES

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /generated -->)", re.S)


def pages() -> list[Path]:
    """README.md and every Markdown page of the docs site."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def render(text: str, where: str) -> str:
    """``text`` with every generated block rewritten.

    Raises:
        KeyError: for a block whose name is not in :data:`TABLES`.
    """
    def fill(m: re.Match) -> str:
        name = m["name"]
        if name not in TABLES:
            raise KeyError(f"{where}: unknown generated block {name!r}; known: {', '.join(sorted(TABLES))}")
        return m[1] + TABLES[name]().rstrip("\n") + "\n" + m[4]

    return BLOCK.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 where a page differs from its results")
    a = ap.parse_args(argv)
    stale, blocks = [], 0
    for page in pages():
        old = page.read_text()
        blocks += len(BLOCK.findall(old))
        new = render(old, str(page.relative_to(ROOT)))
        if new == old:
            continue
        stale.append(page)
        if a.check:
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True), str(page), "generated"))
        else:
            page.write_text(new)
    used = {m["name"] for p in pages() for m in BLOCK.finditer(p.read_text())}
    unused = sorted(set(TABLES) - used)
    if unused:
        print(f"tables no page shows: {', '.join(unused)}", file=sys.stderr)
    verb = "differ from their results" if a.check else "rewritten"
    names = ", ".join(str(p.relative_to(ROOT)) for p in stale)
    print(f"{blocks} generated blocks in {len(pages())} pages; {len(stale)} {verb}" + (f": {names}" if stale else ""))
    return 1 if (a.check and stale) or unused else 0


if __name__ == "__main__":
    raise SystemExit(main())
