"""Tasks, streams and file loaders: the packaged real data and users' own files."""

import json

import pytest

from sharecl.data.files import DataFileError, load_task_file
from sharecl.data.streams import get_stream
from sharecl.data.tasks import Task, split_task


def test_text5_is_real_fixed_and_seeded():
    s = get_stream("text5", seed=0)
    assert [t.name for t in s] == ["bbc-topic", "wordnet-noun", "fortune-topic", "wordnet-verb", "fortune-language"]
    assert [t.num_classes for t in s] == [5, 8, 6, 8, 5]
    assert s.tasks[0].classes == ["business", "entertainment", "politics", "sports", "tech"]
    assert s.tasks[4].classes == ["de", "en", "es", "it", "pt"]
    for t in s:
        assert len(t.test_inputs) == 30 * t.num_classes and len(t.train_inputs) == 48 * t.num_classes
        assert not set(t.train_inputs) & set(t.test_inputs)
    again = get_stream("text5", seed=0)
    other = get_stream("text5", seed=1)
    assert again.tasks[1].train_inputs == s.tasks[1].train_inputs
    assert other.tasks[1].train_inputs != s.tasks[1].train_inputs
    with pytest.raises(KeyError, match="known streams"):
        get_stream("nope")


def test_text20_is_twenty_disjoint_two_class_tasks_drawn_from_the_seed():
    s, cil, other = get_stream("text20", seed=0), get_stream("text20-cil", seed=0), get_stream("text20", seed=1)
    assert len(s.tasks) == 20 and all(t.num_classes == 2 for t in s) and s.scenario == "til" and cil.scenario == "cil"
    classes = [c for t in s for c in t.classes]
    assert len(set(classes)) == 40  # every class in one task only, names unique across sources
    assert sorted(t.name.split("-")[1] for t in s).count("noun") == 12
    for t in s:
        assert len(t.train_inputs) == 96 and len(t.test_inputs) == 60 and not set(t.train_inputs) & set(t.test_inputs)
    assert [t.classes for t in cil] == [t.classes for t in s]
    assert [t.classes for t in other] != [t.classes for t in s]  # pairs and order come from the seed


def test_text_pairs_draws_distinct_two_class_tasks_by_source_quota():
    s, again, other = (get_stream("text-pairs", seed=0), get_stream("text-pairs", seed=0, num_tasks=60),
                       get_stream("text-pairs", seed=1))
    assert len(s.tasks) == 60 and all(t.num_classes == 2 for t in s) and s.scenario == "til"
    pairs = [tuple(t.classes) for t in s]
    assert len(set(pairs)) == 60  # no task twice
    tags = [t.name.split("-")[1] for t in s]
    assert {tag: tags.count(tag) for tag in set(tags)} == {"noun": 27, "verb": 18, "bbc": 6, "fortune": 6, "lang": 3}
    assert all(c.startswith(t.name.split("-")[1] + ".") for t in s for c in t.classes)  # a pair stays in its source
    assert [t.train_inputs for t in again] == [t.train_inputs for t in s]
    assert [t.classes for t in other] != [t.classes for t in s]
    big = get_stream("text-pairs", seed=0, num_tasks=400)  # small sources exhausted, nouns fill the rest
    assert len({tuple(t.classes) for t in big}) == 400 and sum(t.name.endswith("-bbc") for t in big) == 10
    with pytest.raises(ValueError, match="at most"):
        get_stream("text-pairs", num_tasks=403)


def test_validation_splits_come_from_unused_examples_and_leave_train_and_test_unchanged():
    import numpy as np

    from sharecl.data.images import class_split_tasks

    examples = {c: [f"{c} {i}" for i in range(40)] for c in ("a", "b", "c")}
    plain = split_task("t", examples, seed=3, train_per_class=10, test_per_class=5)
    with_val = split_task("t", examples, seed=3, train_per_class=10, test_per_class=5, val_per_class=8)
    assert (with_val.train_inputs, with_val.test_inputs) == (plain.train_inputs, plain.test_inputs)
    assert plain.val_inputs == [] and len(with_val.val_inputs) == 24 and with_val.val_labels == [0] * 8 + [1] * 8 + [2] * 8
    assert not set(with_val.val_inputs) & (set(with_val.train_inputs) | set(with_val.test_inputs))
    assert all(x.split()[0] == with_val.classes[y] for x, y in zip(with_val.val_inputs, with_val.val_labels))
    short = split_task("t", examples, seed=3, train_per_class=30, test_per_class=5, val_per_class=8)
    assert len(short.val_inputs) == 3 * 5  # only 5 per class left over
    uncapped = split_task("t", examples, seed=3, train_per_class=None, test_per_class=5, val_per_class=8)
    assert len(uncapped.train_inputs) == 3 * 27 and not set(uncapped.val_inputs) & set(uncapped.train_inputs)

    images = np.arange(60, dtype=np.uint8).reshape(60, 1, 1).repeat(2, 1)
    labels = np.repeat(np.arange(3), 20)
    kw = dict(seed=1, train_per_class=6, test_per_class=4, source="toy")
    a = class_split_tasks("im", ["x", "y", "z"], [0, 1, 2], 3, (images, labels), None, **kw)[0]
    b = class_split_tasks("im", ["x", "y", "z"], [0, 1, 2], 3, (images, labels), None, val_per_class=5, **kw)[0]
    ids = lambda xs: [int(x[0, 0]) for x in xs]  # noqa: E731
    assert ids(a.train_inputs) == ids(b.train_inputs) and ids(a.test_inputs) == ids(b.test_inputs)
    assert len(b.val_inputs) == 15 and not set(ids(b.val_inputs)) & set(ids(b.train_inputs) + ids(b.test_inputs))
    assert all(labels[i] == y for i, y in zip(ids(b.val_inputs), b.val_labels))

    s = get_stream("text5", seed=0)
    for t in s:
        assert len(t.val_inputs) == 30 * t.num_classes and t.describe()["val_size"] == len(t.val_inputs)
        assert not set(t.val_inputs) & (set(t.train_inputs) | set(t.test_inputs))


def test_images20_is_twenty_seeded_two_class_image_tasks_from_both_datasets():
    s, other = get_stream("images20", seed=0), get_stream("images20", seed=1)
    assert len(s.tasks) == 20 and s.modality == "image" and s.scenario == "til" and all(t.num_classes == 2 for t in s)
    tags = [t.name.split("-")[1] for t in s]
    assert tags.count("fmnist") == 10 and tags.count("mnist") == 10
    assert len({tuple(t.classes) for t in s}) == 20  # no pair twice
    for t in s:
        assert all(c.startswith(t.name.split("-")[1] + ".") for c in t.classes)
        assert len(t.train_inputs) == 200 and len(t.test_inputs) == 100 and len(t.val_inputs) == 100
        assert t.train_inputs[0].shape == (28, 28) and t.train_inputs[0].dtype.name == "uint8"
    assert [t.classes for t in other] != [t.classes for t in s]


def test_csv_jsonl_and_saved_dataset(tmp_path):
    import datasets

    rows = [{"text": f"item {i} {'cat' if i % 2 else 'dog'}", "label": "cat" if i % 2 else "dog"} for i in range(20)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "d.csv").write_text("text,label\n" + "\n".join(f"{r['text']},{r['label']}" for r in rows))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    tasks = [load_task_file(tmp_path / n, "t", seed=3) for n in ("d.jsonl", "d.csv", "hf")]
    for t in tasks:
        assert t.classes == ["cat", "dog"] and len(t.train_inputs) + len(t.test_inputs) == 20
    assert tasks[0].train_inputs == tasks[1].train_inputs == tasks[2].train_inputs
    with pytest.raises(DataFileError, match="label 'cat' is not one of"):
        load_task_file(tmp_path / "d.csv", "t", classes=["dog", "bird"])


@pytest.mark.parametrize("content,suffix,msg", [("", ".csv", "is empty"), ("text,label\n", ".csv", "has no rows"),
                                                ("text\nhello\n", ".csv", "lacks column"), ("{not json", ".jsonl", "cannot read"),
                                                ("a,b", ".txt", "unsupported data file"),
                                                ("text,label\nhi,a\nhi,a\n", ".csv", "at least 2")])
def test_bad_files(tmp_path, content, suffix, msg):
    f = tmp_path / f"bad{suffix}"
    f.write_text(content)
    with pytest.raises(DataFileError, match=msg):
        load_task_file(f, "t")


def test_task_validation():
    with pytest.raises(ValueError, match="outside"):
        Task("t", ["a", "b"], ["x"], [2], [], [])
    with pytest.raises(ValueError, match="invalid task name"):
        split_task("a b", {"a": ["x"], "b": ["y"]}, seed=0, train_per_class=None, test_per_class=0)
