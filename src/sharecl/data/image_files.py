"""Image datasets in the formats users have on disk, and task streams declared in a file.

- an image-folder tree ``root/<class>/*.jpg|png|…`` (the layout of ImageNet-R), optionally
  with ``train/`` and ``test/`` sub-trees;
- CIFAR-10 / CIFAR-100, binary version (``*.bin`` records) or python version (pickles, read
  with :class:`RestrictedUnpickler`, which admits only numpy arrays and plain containers);
- a Hugging Face ``datasets`` dataset saved with ``save_to_disk`` that has an image column;
- a stream file (YAML or JSON) naming a dataset, a class split and a seed (:func:`load_stream_file`).

Every loader returns :class:`ImageData`: ``images`` (a numpy object array of uint8 ``(H, W, 3)``
arrays, or a uint8 array ``(N, H, W[, 3])``), int64 ``labels`` and the class names.
"""

from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["ImageData", "UnsafePickleError", "RestrictedUnpickler", "load_image_folder", "load_cifar",
           "load_hf_image_dataset", "load_stream_file", "image_source_kind", "load_image_task", "read_image", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class ImageData:
    """Images with labels: ``images[i]`` uint8 ``(H, W[, C])``, ``labels`` int64 ``(N,)``, ``classes[label]``."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]


def _objects(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = a
    return out


def _decode(path: Path, max_side: int | None) -> np.ndarray:
    from sharecl.vision.decode import ImageRefused, decode_image

    try:
        with open(path, "rb") as fh:
            return decode_image(fh, max_side, what=f"image {path}")
    except ImageRefused as exc:
        raise ValueError(f"{exc}; remove or replace the file") from exc


def read_image(path: str | Path, max_side: int | None = 256) -> np.ndarray:
    """One image file as RGB uint8 ``(H, W, 3)`` (shorter side reduced to ``max_side``).

    Raises:
        FileNotFoundError: no such file; ValueError: a file PIL cannot read (named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    return _decode(path, max_side)


def load_image_folder(root: str | Path, *, max_side: int | None = 256) -> ImageData | tuple[ImageData, ImageData]:
    """Read ``root/<class>/<image>``; with ``root/train`` and ``root/test`` present, returns ``(train, test)``.

    Class names are the sub-directory names, sorted; files with other extensions are ignored.
    Images are decoded once to RGB uint8 (shorter side reduced to ``max_side`` pixels).

    Raises:
        FileNotFoundError: ``root`` missing; ValueError: no class directory with images, a class
            of ``test`` unknown to ``train``, or an unreadable image (named).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory; expected root/<class>/<image files>")
    if (root / "train").is_dir() and (root / "test").is_dir():
        train, test = load_image_folder(root / "train", max_side=max_side), load_image_folder(root / "test", max_side=max_side)
        if isinstance(train, tuple) or isinstance(test, tuple):
            raise ValueError(f"{root}/train and {root}/test must each hold <class>/<image> directories, not train/ and test/ again")
        unknown = sorted(set(test.classes) - set(train.classes))
        if unknown:
            raise ValueError(f"{root}/test has classes {unknown[:5]} that {root}/train lacks")
        remap = np.array([train.classes.index(c) for c in test.classes], dtype=np.int64)
        return train, ImageData(test.images, remap[test.labels], train.classes)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and any(f.suffix.lower() in IMAGE_EXTENSIONS for f in d.iterdir()))
    if not classes:
        raise ValueError(f"{root} has no class sub-directory with image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    images, labels = [], []
    for label, c in enumerate(classes):
        for f in sorted((root / c).iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                images.append(_decode(f, max_side))
                labels.append(label)
    return ImageData(_objects(images), np.array(labels, dtype=np.int64), classes)


class UnsafePickleError(ValueError):
    """A pickle asked for something other than numpy arrays and plain containers."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only what the CIFAR python files hold: dicts, lists, strings, numbers and numpy
    arrays. Any other global (``os.system``, ``builtins.eval``, a class) raises :class:`UnsafePickleError`."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise UnsafePickleError(f"refusing to unpickle {module}.{name}: only numpy arrays and plain Python "
                                f"containers are admitted; this is not a CIFAR python file (or it was tampered with)")


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as fh:
        data = RestrictedUnpickler(fh, encoding="bytes").load()
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict, got {type(data).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}


def _names(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def load_cifar(root: str | Path, split: str = "train") -> ImageData:
    """CIFAR-10 or CIFAR-100 (fine labels) from the directory its archive unpacks to, either
    version: python (``data_batch_1…5``/``test_batch`` + ``batches.meta``; ``train``/``test`` +
    ``meta``) or binary (``data_batch_1…5.bin``/``test_batch.bin`` + ``batches.meta.txt``;
    ``train.bin``/``test.bin`` + ``fine_label_names.txt``). Images ``(N, 32, 32, 3)`` uint8.

    Raises:
        ValueError: for another split, an unrecognised directory, or a malformed file;
        UnsafePickleError: for a pickle holding anything but arrays and containers.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)

    def to_images(flat: np.ndarray) -> np.ndarray:
        return flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()

    if (root / "batches.meta").exists():  # CIFAR-10, python
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        parts = [_unpickle(root / f) for f in files if (root / f).exists()]
        if not parts:
            raise ValueError(f"{root} has no {files[0]}")
        classes = _names(_unpickle(root / "batches.meta")["label_names"])
        x = np.concatenate([np.asarray(p["data"], dtype=np.uint8) for p in parts])
        y = np.concatenate([np.asarray(p["labels"], dtype=np.int64) for p in parts])
        return ImageData(to_images(x), y, classes)
    if (root / "meta").exists() and (root / split).exists():  # CIFAR-100, python
        d = _unpickle(root / split)
        classes = _names(_unpickle(root / "meta")["fine_label_names"])
        return ImageData(to_images(np.asarray(d["data"], dtype=np.uint8)), np.asarray(d["fine_labels"], dtype=np.int64), classes)
    if (root / "batches.meta.txt").exists():  # CIFAR-10, binary: <label><3072 pixels>
        files = [f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train" else ["test_batch.bin"]
        raw = [np.fromfile(root / f, dtype=np.uint8) for f in files if (root / f).exists()]
        classes = [ln.strip() for ln in (root / "batches.meta.txt").read_text().splitlines() if ln.strip()]
        rec, label_at = 3073, 0
    elif (root / "fine_label_names.txt").exists():  # CIFAR-100, binary: <coarse><fine><3072 pixels>
        raw = [np.fromfile(root / f"{split}.bin", dtype=np.uint8)] if (root / f"{split}.bin").exists() else []
        classes = [ln.strip() for ln in (root / "fine_label_names.txt").read_text().splitlines() if ln.strip()]
        rec, label_at = 3074, 1
    else:
        raise ValueError(f"{root} is not a CIFAR directory (no batches.meta, meta, batches.meta.txt or fine_label_names.txt)")
    if not raw:
        raise ValueError(f"{root} has no {split} file")
    data = np.concatenate(raw)
    if data.size % rec:
        raise ValueError(f"{root}: {data.size} bytes is not a whole number of {rec}-byte CIFAR records (truncated file?)")
    data = data.reshape(-1, rec)
    return ImageData(to_images(data[:, rec - 3072:]), data[:, label_at].astype(np.int64), classes)


def load_hf_image_dataset(path: str | Path, split: str | None = None, *, image_column: str = "image",
                          label_column: str = "label") -> ImageData:
    """A ``datasets`` dataset saved with ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict`` with
    ``split``); images decoded to RGB uint8, class names from the label column's ``ClassLabel``.

    Raises:
        ValueError: a missing split or column (the message lists what exists).
    """
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise ValueError(f"{path} holds splits {list(ds)}; pass one of them (got {split!r})")
        ds = ds[split]
    for col in (image_column, label_column):
        if col not in ds.column_names:
            raise ValueError(f"{path} has no column {col!r}; columns: {ds.column_names}")
    feature = ds.features[label_column]
    labels = np.asarray(ds[label_column], dtype=np.int64)
    classes = list(feature.names) if hasattr(feature, "names") else [str(c) for c in range(int(labels.max()) + 1)]
    images = []
    for im in ds[image_column]:
        if isinstance(im, dict) and im.get("bytes") is not None:
            im = Image.open(io.BytesIO(im["bytes"]))
        images.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    return ImageData(_objects(images), labels, classes)


def load_stream_file(path: str | Path, **overrides):
    """A task stream declared in YAML or JSON, for example::

        name: my-cifar10
        dataset: {format: cifar, path: data/cifar-10-batches-py}   # or image-folder, hf-disk
        classes_per_task: 2        # or tasks: [[cat, dog], [ship, truck]]
        scenario: cil              # or til
        seed: 0                    # class order (without `tasks`) and per-class draws
        train_per_class: 200       # optional caps
        test_per_class: 100
        image_size: 56

    A dataset without a test split (an image folder without ``train/``/``test/``) holds out
    ``test_per_class`` images per class (20 % without a cap). Relative paths are read from the
    stream file's directory. ``overrides`` (``seed``, ``train_per_class``, ``test_per_class``,
    ``image_size``) replace the file's values, so ``sharecl compare --seeds`` works on a file.

    Raises:
        ValueError: unknown keys, formats or class names, or classes that do not split evenly.
    """
    import random

    import yaml

    from sharecl.data.images import class_split_tasks
    from sharecl.data.tasks import Stream

    path = Path(path)
    spec = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
    known = {"name", "dataset", "classes_per_task", "tasks", "scenario", "seed", "train_per_class", "test_per_class", "image_size"}
    if not isinstance(spec, dict) or set(spec) - known:
        raise ValueError(f"{path}: unknown keys {sorted(set(spec) - known) if isinstance(spec, dict) else spec!r}; known: {sorted(known)}")
    bad = sorted(set(overrides) - {"seed", "train_per_class", "test_per_class", "image_size"})
    if bad:
        raise ValueError(f"a stream file takes no option {', '.join(bad)}")
    spec.update({k: v for k, v in overrides.items() if v is not None})
    ds = dict(spec.get("dataset") or {})
    fmt, where = ds.pop("format", None), ds.pop("path", None)
    if where is None:
        raise ValueError(f"{path}: dataset.path is missing")
    where = (path.parent / where) if not Path(where).is_absolute() else Path(where)
    if fmt == "image-folder":
        got = load_image_folder(where, **ds)
        train, test = got if isinstance(got, tuple) else (got, None)
    elif fmt == "cifar":
        train, test = load_cifar(where, "train"), load_cifar(where, "test")
    elif fmt == "hf-disk":  # options: train_split (default train), test_split (default test; null: hold out)
        train_split, test_split = ds.pop("train_split", "train"), ds.pop("test_split", "test")
        train = load_hf_image_dataset(where, train_split, **ds)
        test = None if test_split is None else load_hf_image_dataset(where, test_split, **ds)
    else:
        raise ValueError(f"{path}: dataset.format must be image-folder, cifar or hf-disk, got {fmt!r}")
    seed = int(spec.get("seed", 0))
    if "tasks" in spec:
        groups = [[train.classes.index(c) if c in train.classes else _unknown(path, c, train.classes) for c in g] for g in spec["tasks"]]
    else:
        per = int(spec.get("classes_per_task", 2))
        order = list(range(len(train.classes)))
        random.Random(seed).shuffle(order)
        if len(order) % per:
            raise ValueError(f"{path}: {len(order)} classes do not split into tasks of {per}; set `tasks` explicitly")
        groups = [order[i: i + per] for i in range(0, len(order), per)]
    tasks = []
    for g in groups:  # tasks may have different sizes when listed explicitly: one call per task
        tasks += class_split_tasks("t", train.classes, g, len(g), (train.images, train.labels),
                                   None if test is None else (test.images, test.labels), seed=seed,
                                   train_per_class=spec.get("train_per_class"), test_per_class=spec.get("test_per_class"),
                                   source=f"{fmt} {where}")
    from sharecl.data.tasks import check_task_name

    name = str(spec.get("name", path.stem))
    for i, t in enumerate(tasks):
        t.name = check_task_name(f"{name}-{i + 1}")
    if spec.get("scenario", "cil") not in ("til", "cil"):
        raise ValueError(f"{path}: scenario must be til or cil, got {spec['scenario']!r}")
    return Stream(name, tasks, seed, spec.get("scenario", "cil"), modality="image", image_size=int(spec.get("image_size", 56)))


def image_source_kind(path: str | Path) -> str | None:
    """What ``path`` holds when it holds images: ``"image-folder"`` (``root/<class>/<image>``,
    optionally under ``train/`` and ``test/``), ``"hf-disk"`` (a ``save_to_disk`` directory with an
    ``Image`` column), ``"stream-file"`` (``.yaml``/``.yml``, or a ``.json`` object with a
    ``dataset`` key); ``None`` for anything else (text files, text datasets, missing paths).
    Reads directory listings and small metadata files only."""
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() in (".yaml", ".yml"):
            return "stream-file"
        if p.suffix.lower() == ".json" and p.stat().st_size < 1_000_000:
            try:
                spec = json.loads(p.read_text())
            except (ValueError, UnicodeDecodeError):  # JSON lines, or not JSON: a text data file
                return None
            return "stream-file" if isinstance(spec, dict) and "dataset" in spec else None
        return None
    if not p.is_dir():
        return None
    infos = [p / "dataset_info.json"] + [p / d / "dataset_info.json" for d in _splits(p)]
    for info in infos:
        if info.exists():
            features = json.loads(info.read_text()).get("features") or {}
            return "hf-disk" if any(isinstance(f, dict) and f.get("_type") == "Image" for f in features.values()) else None
    roots = [p / "train"] if (p / "train").is_dir() and (p / "test").is_dir() else [p]
    for r in roots:
        for d in r.iterdir():
            if d.is_dir() and any(f.suffix.lower() in IMAGE_EXTENSIONS for f in d.iterdir()):
                return "image-folder"
    return None


def _splits(p: Path) -> list[str]:
    f = p / "dataset_dict.json"
    return list(json.loads(f.read_text()).get("splits", [])) if f.exists() else []


def load_image_task(path: str | Path, name: str, *, seed: int = 0, image_column: str = "image",
                    label_column: str = "label", max_side: int | None = 256):
    """One labelled image task for ``sharecl learn``: returns ``(task, image_size)``.

    - an image folder or a ``datasets`` directory: every class is a class of the task; the
      ``test`` split (``root/test``, a ``DatasetDict``'s ``test``) is the held-out set, else 20 %
      of each class is held out with ``seed``. ``image_size`` is ``None`` (the store's or the
      command's choice).
    - a stream file (:func:`load_stream_file`): ``name`` picks one of its tasks (``<stream>-<i>``);
      ``image_size`` is the stream's.

    Raises:
        ValueError: ``path`` holds no images, a stream has no task ``name`` (the message lists
            them), fewer than two classes, or any loader error.
    """
    from sharecl.data.images import class_split_tasks

    kind = image_source_kind(path)
    if kind == "stream-file":
        stream = load_stream_file(path, seed=seed)
        names = [t.name for t in stream]
        if name not in names:
            raise ValueError(f"{path} declares tasks {', '.join(names)}; pass one of them as --task")
        return stream.tasks[names.index(name)], stream.image_size
    if kind == "image-folder":
        got = load_image_folder(path, max_side=max_side)
        train, test = got if isinstance(got, tuple) else (got, None)
    elif kind == "hf-disk":
        splits = _splits(Path(path))
        if splits and "train" not in splits:
            raise ValueError(f"{path} holds splits {splits}; learn needs a 'train' split (and optionally 'test')")
        opts = {"image_column": image_column, "label_column": label_column}
        train = load_hf_image_dataset(path, "train" if splits else None, **opts)
        test = load_hf_image_dataset(path, "test", **opts) if "test" in splits else None
    else:
        raise ValueError(f"{path} holds no images: expected an image folder root/<class>/<image>, a datasets "
                         f"directory with an Image column, or a stream file (.yaml/.json)")
    if len(train.classes) < 2:
        raise ValueError(f"{path}: found {len(train.classes)} class(es); a classification task needs at least 2")
    task = class_split_tasks(name, train.classes, list(range(len(train.classes))), len(train.classes),
                             (train.images, train.labels), None if test is None else (test.images, test.labels),
                             seed=seed, train_per_class=None, test_per_class=None, source=f"{kind} {path}")[0]
    task.name = name
    return task, None


def _unknown(path, name, classes):
    raise ValueError(f"{path}: class {name!r} is not in the dataset; classes: {classes[:20]}")
