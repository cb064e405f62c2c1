"""The README and the docs site: results tables match the committed results, every module has
an API page, the README stays short and names the command CI runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_results_table_matches_the_committed_results():
    """``benchmarks/results_pages.py --check`` rewrites nothing: a table edited by hand, or results
    changed without regenerating the pages, fails here (the diff is printed)."""
    out = subprocess.run([sys.executable, "benchmarks/results_pages.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 differ" in out.stdout


def test_results_check_fails_on_an_edited_table(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import results_pages

    page = (ROOT / "docs" / "results" / "text5.md").read_text()
    edited = page.replace("82.75 ± 0.62", "92.75 ± 0.62", 1)
    assert edited != page
    assert results_pages.render(edited, "text5.md") == page  # regenerating restores the committed numbers


def test_every_module_has_an_api_page():
    mods = {".".join(p.relative_to(ROOT / "src").with_suffix("").parts).removesuffix(".__init__")
            for p in (ROOT / "src" / "sharecl").rglob("*.py") if p.name != "__main__.py"}
    documented = {m for p in (ROOT / "docs" / "api").glob("*.md") for m in re.findall(r"^::: ([\w.]+)", p.read_text(), re.M)}
    assert mods - documented == set(), f"modules without an API page: {sorted(mods - documented)} (add '::: module' to docs/api/*.md)"


def test_readme_is_short_and_names_the_command_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.startswith("bash scripts/setup.sh")]
    assert ci and ci[0] in readme, "the README's test command and .ci/run must be the same line"
    for page in re.findall(r"\]\(([\w/.-]+\.md)\)", readme):
        assert (ROOT / page).exists() or (ROOT / "docs" / page).exists(), page
