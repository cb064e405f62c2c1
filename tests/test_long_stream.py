"""The long generation stream ``gen30`` (issue 31): construction on synthetic sources, the
Debian readers on synthetic files, and (slow) every task built from the real packaged data."""

from __future__ import annotations

import gzip
import json

import pytest

from sharecl.data.tasks import check_task_name
from sharecl.generation.long_stream import GEN30_EXTRA_TASKS, GEN30_TASKS, TaskSource, gen30, task_pairs, unambiguous
from sharecl.generation.scoring import METRICS


def _source(name, n, metric="exact-match", dup=0):
    pairs = [(f"{name} question {i}?", f"answer {i}") for i in range(n)]
    pairs += [(f"{name} question {i}?", f"other answer {i}") for i in range(dup)]  # ambiguous prompts
    return TaskSource(name, lambda: list(pairs), metric, 6, f"synthetic {name}")


SOURCES = [_source("alpha", 300), _source("beta", 90, "rouge-l"), _source("gamma", 200, dup=50)]


def test_gen30_splits_are_seeded_disjoint_and_sized():
    a, b, c = gen30(0, sources=SOURCES), gen30(0, sources=SOURCES), gen30(1, sources=SOURCES)
    assert [t.name for t in a] == ["alpha", "beta", "gamma"] and a.modality == "lm" and a.scenario == "til"
    for ta, tb, tc in zip(a, b, c):
        assert (ta.train_inputs, ta.test_inputs, ta.val_inputs) == (tb.train_inputs, tb.test_inputs, tb.val_inputs)
        assert ta.test_inputs != tc.test_inputs  # another seed draws other splits
        prompts = [{p for p, _ in split} for split in (ta.train_inputs, ta.test_inputs, ta.val_inputs)]
        assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
        assert len(ta.test_inputs) == len(ta.val_inputs) == 24
    # a small source gives fewer training pairs, never fewer test pairs
    assert [len(t.train_inputs) for t in a] == [120, 90 - 48, 150 - 48]  # gamma: 50 ambiguous prompts dropped
    assert a.tasks[1].metric == "rouge-l" and a.tasks[0].meta["source"] == "synthetic alpha"


def test_gen30_drops_ambiguous_prompts_only_for_exact_match():
    s = gen30(0, sources=[_source("gamma", 200, dup=50), _source("delta", 200, "rouge-l", dup=50)])
    gamma, delta = s.tasks
    assert gamma.meta["pairs_available"] == 150  # the 50 prompts with two answers are gone
    assert delta.meta["pairs_available"] == 200  # ROUGE-L keeps a prompt's first answer
    every = gamma.train_inputs + gamma.test_inputs + gamma.val_inputs
    assert all(int(p.split()[-1].rstrip("?")) >= 50 for p, _ in every)
    assert all(c == "answer " + p.split()[-1].rstrip("?") for p, c in delta.train_inputs + delta.test_inputs)
    assert unambiguous([("q", "a"), ("r", "b"), ("q", "c"), ("r", "b")]) == [("r", "b"), ("r", "b")]


def test_gen30_refuses_a_source_too_small_naming_it():
    with pytest.raises(ValueError, match="tiny.*40 distinct prompts"):
        gen30(0, sources=[_source("tiny", 40)])
    assert len(gen30(0, sources=SOURCES, tasks=2).tasks) == 2


def test_catalogue_has_thirty_plus_named_tasks_with_both_metrics():
    names = [t.name for t in GEN30_TASKS]
    assert len(names) >= 30 and len(set(names)) == len(names)
    for t in GEN30_TASKS:
        check_task_name(t.name)
        assert t.metric in METRICS and t.max_new_tokens >= 4 and t.source
    em = sum(t.metric == "exact-match" for t in GEN30_TASKS)
    assert em >= len(names) / 3 and len(names) - em >= len(names) / 3
    with pytest.raises(KeyError, match="unknown gen30 task 'nope'"):
        task_pairs("nope")
    extra = [t.name for t in GEN30_EXTRA_TASKS]
    assert len(names) + len(extra) >= 50 and not set(extra) & set(names) and len(set(extra)) == len(extra)
    for t in GEN30_EXTRA_TASKS:
        check_task_name(t.name)
        assert t.metric in METRICS and t.max_new_tokens >= 2 and t.source


# ------------------------------------------------------------ readers on synthetic Debian files
def _b64(n: int) -> str:
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    out = ""
    while True:
        out = digits[n % 64] + out
        n //= 64
        if not n:
            return out


@pytest.fixture
def debian(tmp_path, monkeypatch):
    wn = tmp_path / "usr/share/wordnet"
    wn.mkdir(parents=True)
    (wn / "data.adj").write_text(
        "  1 This software and database is being provided\n"
        "00000010 00 a 02 good 0 full_of_grace 0 001 ! 00000020 a 0201 | having desirable qualities; \"a good dog\"\n"
        "00000020 00 a 01 bad 0 002 ! 00000010 a 0102 \\ 00000030 n 0101 | having undesirable qualities\n")
    (wn / "data.noun").write_text(
        "00000030 03 n 01 badness 0 001 @ 00000040 n 0000 | the quality of being bad\n"
        "00000040 07 n 01 quality 0 000 | an essential attribute\n")
    (wn / "verb.exc").write_text("went go\nbetter_off well_off\n")
    dictd = tmp_path / "usr/share/dictd"
    dictd.mkdir(parents=True)
    entries = [("00-database-info", "00-database-info\n info"), ("Iron", "Iron\n Symbol: Fe\n Atomic number: 26\n"),
               ("LOL", "LOL\n Laughing Out Loud (chat)\n")]
    blob, index = b"", []
    for head, text in entries:
        data = text.encode()
        index.append(f"{head}\t{_b64(len(blob))}\t{_b64(len(data))}")
        blob += data
    (dictd / "elements.index").write_text("\n".join(index) + "\n")
    (dictd / "elements.dict.dz").write_bytes(gzip.compress(blob))
    iso = tmp_path / "usr/share/iso-codes/json"
    iso.mkdir(parents=True)
    (iso / "iso_3166-1.json").write_text(json.dumps({"3166-1": [{"alpha_2": "FR", "alpha_3": "FRA", "name": "France"}]}))
    misc = tmp_path / "usr/share/misc"
    misc.mkdir(parents=True)
    with gzip.open(misc / "countries.gz", "wt") as fh:
        fh.write("# comment\nFR:FRA:250:France:Paris:Europe\n")
    monkeypatch.setenv("SHARECL_DEBIAN_DIR", str(tmp_path))
    return tmp_path


def test_readers_parse_synthetic_debian_files(debian):
    from sharecl.data import reference

    adj = reference.wordnet_synsets("adj")
    assert adj[10].lemmas == ["good", "full of grace"] and adj[10].lexfile == "adj.all"
    assert adj[10].definition == "having desirable qualities" and adj[10].examples == ["a good dog"]
    assert adj[20].pointers == [("!", 10, "a", "0102"), ("\\", 30, "n", "0101")]
    assert reference.wordnet_exceptions("verb") == [("went", "go"), ("better off", "well off")]
    assert reference.dictd_entries("elements", "dict-elements") == [
        ("Iron", " Symbol: Fe\n Atomic number: 26\n"), ("LOL", " Laughing Out Loud (chat)\n")]
    assert reference.iso_codes("3166-1") == [{"alpha_2": "FR", "alpha_3": "FRA", "name": "France"}]
    assert reference.misc_table("countries") == [["FR", "FRA", "250", "France", "Paris", "Europe"]]
    with pytest.raises(FileNotFoundError, match="dict-jargon"):
        reference.dictd_entries("jargon", "dict-jargon")
    with pytest.raises(ValueError, match="pos must be one of"):
        reference.wordnet_synsets("pronoun")


def test_task_builders_follow_wordnet_word_numbers(debian):
    # the antonym pointer of "good" names source word 2 ("full of grace") and target word 1 ("bad")
    antonyms = dict((p.split('"')[1], c) for p, c in task_pairs("antonym"))
    assert antonyms == {"full of grace": "bad", "bad": "full of grace"}
    assert [c for _, c in task_pairs("pertainym")] == ["badness"]
    assert [c for _, c in task_pairs("hypernym")] == ["quality"]
    assert [c for _, c in task_pairs("verb-base")] == ["go"]  # "better off" is two words: dropped
    assert task_pairs("element-symbol") == [("Which chemical element has the symbol Fe?", "Iron")]
    assert task_pairs("element-number") == [("What is the atomic number of Iron?", "26")]
    assert task_pairs("country-code") == [("Which country has the ISO code FR?", "France")]
    assert task_pairs("capital") == [("What is the capital of France?", "Paris")]
    # the extra tasks read the same records backwards
    assert task_pairs("symbol-of-element") == [("What is the chemical symbol of Iron?", "Fe")]
    assert task_pairs("element-of-number") == [("Which chemical element has atomic number 26?", "Iron")]
    assert task_pairs("alpha2-of-country") == [("What is the ISO 3166 alpha-2 code of France?", "FR")]
    assert task_pairs("country-of-capital") == [("Which country has the capital Paris?", "France")]


@pytest.mark.slow
def test_gen30_builds_every_task_from_the_packaged_data():
    s = gen30(0)
    assert len(s.tasks) == len(GEN30_TASKS) >= 30
    for t in s:
        assert len(t.test_inputs) == len(t.val_inputs) == 24 and len(t.train_inputs) >= 64, t.name
        assert t.meta["pairs_available"] >= 112, t.name
    facts = {t.name: dict(t.train_inputs + t.test_inputs + t.val_inputs) for t in s}
    verbs = dict(task_pairs("verb-base"))
    assert verbs['What is the base form of the verb "went"? Answer with one word.'] == "go"
    assert dict(task_pairs("element-symbol"))["Which chemical element has the symbol Fe?"].lower() == "iron"
    assert dict(task_pairs("country-code"))["Which country has the ISO code FR?"] == "France"
    assert dict(task_pairs("capital"))["What is the capital of France?"] == "Paris"
    assert all(len(v) >= 112 for v in facts.values())
    extra = gen30(0, sources=GEN30_EXTRA_TASKS, val_size=0)  # what bench_lm_adapters.py trains on, beyond the 36
    assert [t.name for t in extra] == [t.name for t in GEN30_EXTRA_TASKS]
    assert all(len(t.test_inputs) == 24 and len(t.train_inputs) >= 64 for t in extra)
    assert dict(task_pairs("noun-plural"))['What is the plural of the noun "goose"? Answer with one word.'] == "geese"
