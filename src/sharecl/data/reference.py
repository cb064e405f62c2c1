"""Reference data shipped in Debian packages, read as records: WordNet's synsets and relations,
dictd dictionaries (``dict-elements``, ``dict-vera``, ``dict-jargon``, ``dict-foldoc``), ISO code
lists (``iso-codes``) and ``miscfiles`` tables. The long generation stream
(:mod:`sharecl.generation.long_stream`) builds its tasks from them.

Every reader takes its files from :func:`sharecl.data.packaged.debian_root` (``scripts/setup.sh``
unpacks the packages there) and raises ``FileNotFoundError`` naming the package when one is
missing.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from sharecl.data.packaged import LEXNAMES, debian_root

__all__ = ["Synset", "wordnet_synsets", "wordnet_exceptions", "dictd_entries", "iso_codes", "misc_table"]

_POS_FILES = {"noun": "noun", "verb": "verb", "adj": "adj", "adv": "adv"}
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _need(relative: str, package: str) -> Path:
    try:
        return debian_root(relative)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc} (Debian package {package})") from None


@dataclass
class Synset:
    """One WordNet 3.0 synset (wndb(5WN)).

    Attributes:
        offset: its byte offset in ``data.<pos>`` (its id within the part of speech).
        pos: ``n``, ``v``, ``a``, ``s`` (satellite adjective) or ``r``.
        lexfile: its lexicographer file (supersense), e.g. ``noun.animal``.
        lemmas: its words, ``_`` replaced by spaces, in file order.
        pointers: ``(symbol, target offset, target pos, source/target word numbers)``.
        definition: the gloss up to its first ``;`` or example.
        examples: the quoted example sentences of the gloss.
        gloss: the whole gloss as the file has it (definition, examples), white space stripped.
    """

    offset: int
    pos: str
    lexfile: str
    lemmas: list[str]
    pointers: list[tuple[str, int, str, str]] = field(default_factory=list)
    definition: str = ""
    examples: list[str] = field(default_factory=list)
    gloss: str = ""


def _parse_gloss(gloss: str) -> tuple[str, list[str]]:
    parts = [p.strip() for p in gloss.split(";")]
    definition = next((p for p in parts if p and not p.startswith('"')), "")
    examples = [p.strip('"').strip() for p in parts if p.startswith('"') and p.endswith('"') and len(p) > 2]
    return definition, examples


def wordnet_synsets(pos: str) -> dict[int, Synset]:
    """Every synset of ``pos`` (``noun``, ``verb``, ``adj``, ``adv``) by offset, from Debian
    ``wordnet-base``'s ``data.<pos>`` (read once per file and process).

    Raises:
        ValueError: an unknown part of speech; FileNotFoundError: WordNet not unpacked.
    """
    if pos not in _POS_FILES:
        raise ValueError(f"pos must be one of {sorted(_POS_FILES)}, got {pos!r}")
    return _read_synsets(_need("usr/share/wordnet", "wordnet-base") / f"data.{_POS_FILES[pos]}")


@cache
def _read_synsets(path: Path) -> dict[int, Synset]:
    out: dict[int, Synset] = {}
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("  "):  # licence header
                continue
            head, _, gloss = line.partition(" | ")
            f = head.split()
            n_words = int(f[3], 16)
            lemmas = [f[4 + 2 * i].replace("_", " ") for i in range(n_words)]
            i = 4 + 2 * n_words
            n_ptr = int(f[i])
            ptrs = [(f[i + 1 + 4 * j], int(f[i + 2 + 4 * j]), f[i + 3 + 4 * j], f[i + 4 + 4 * j]) for j in range(n_ptr)]
            gloss = gloss.strip()
            definition, examples = _parse_gloss(gloss)
            out[int(f[0])] = Synset(int(f[0]), f[2], LEXNAMES[int(f[1])], lemmas, ptrs, definition, examples, gloss)
    return out


def wordnet_exceptions(pos: str) -> list[tuple[str, str]]:
    """``(inflected form, base form)`` pairs of WordNet's morphological exception list
    ``<pos>.exc`` (``verb``: awoke → awake; ``noun``: geese → goose; ``adj``: better → good).

    Raises:
        FileNotFoundError: WordNet not unpacked.
    """
    path = _need("usr/share/wordnet", "wordnet-base") / f"{_POS_FILES[pos]}.exc"
    pairs = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        words = line.split()
        if len(words) >= 2:
            pairs.append((words[0].replace("_", " "), words[1].replace("_", " ")))
    return pairs


def _b64(s: str) -> int:
    value = 0
    for c in s:
        value = value * 64 + _B64.index(c)
    return value


def dictd_entries(name: str, package: str) -> list[tuple[str, str]]:
    """``(headword, body)`` of every entry of a dictd dictionary ``usr/share/dictd/<name>``
    (``.index`` + gzip-compressed ``.dict.dz``), the database's own ``00-database-*`` entries
    left out; the body is the entry's text after its headword line.

    Raises:
        FileNotFoundError: the dictionary is not unpacked (names ``package``).
    """
    root = _need("usr/share/dictd", package)
    index, data = root / f"{name}.index", root / f"{name}.dict.dz"
    if not index.is_file() or not data.is_file():
        raise FileNotFoundError(f"{index} / {data} missing (Debian package {package}); run `bash scripts/setup.sh`")
    raw = gzip.open(data).read()
    out = []
    for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
        head, _, rest = line.partition("\t")
        off, _, length = rest.partition("\t")
        if not head or head.startswith("00") or not off or not length:
            continue
        text = raw[_b64(off): _b64(off) + _b64(length.split("\t")[0])].decode("utf-8", errors="replace")
        _, _, body = text.partition("\n")
        out.append((head, body))
    return out


def iso_codes(standard: str) -> list[dict]:
    """The records of an ISO list in Debian ``iso-codes`` (``3166-1`` countries, ``4217``
    currencies, ``639-2`` languages, …) as dicts (``alpha_2``, ``alpha_3``, ``name``, …).

    Raises:
        FileNotFoundError: iso-codes not unpacked.
    """
    path = _need("usr/share/iso-codes/json", "iso-codes") / f"iso_{standard}.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    return next(v for k, v in data.items() if isinstance(v, list))


def misc_table(name: str) -> list[list[str]]:
    """The rows of a ``miscfiles`` table ``usr/share/misc/<name>.gz`` (``countries``,
    ``airport``, ``currency``…), split on ``:``, comment lines left out.

    Raises:
        FileNotFoundError: miscfiles not unpacked.
    """
    path = _need("usr/share/misc", "miscfiles") / f"{name}.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing (Debian package miscfiles); run `bash scripts/setup.sh`")
    rows = []
    for line in gzip.open(path, "rt", encoding="utf-8", errors="replace"):
        line = line.rstrip("\n")
        if line and not line.startswith("#"):
            rows.append(line.split(":"))
    return rows
