"""Image formats on disk (fixtures made here): image folders, CIFAR binary and python (with the
restricted unpickler), `datasets` saved to disk, and stream files."""

import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from sharecl.data.image_files import UnsafePickleError, load_cifar, load_hf_image_dataset, load_image_folder, load_stream_file


def _images(n, seed, h=32, w=32):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _folder(root, classes=("cat", "dog", "fox", "owl"), per=6, ext=".png"):
    for i, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for j, a in enumerate(_images(per, i, 20, 24)):
            Image.fromarray(a).save(root / c / f"{j}{ext}")
    (root / "README.txt").write_text("not an image")
    return root


def test_image_folder(tmp_path):
    root = _folder(tmp_path / "imgs")
    (root / "cat" / "notes.txt").write_text("ignored")
    d = load_image_folder(root)
    assert d.classes == ["cat", "dog", "fox", "owl"] and len(d.images) == 24 and np.bincount(d.labels).tolist() == [6] * 4
    assert d.images[0].shape == (20, 24, 3) and d.images[0].dtype == np.uint8
    assert np.array_equal(d.images[0], _images(6, 0, 20, 24)[0])  # png is lossless
    split = tmp_path / "split"
    _folder(split / "train")
    _folder(split / "test", classes=("dog", "owl"), per=2)
    train, test = load_image_folder(split)
    assert test.classes == train.classes and sorted(set(test.labels.tolist())) == [1, 3]
    (root / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        load_image_folder(root)
    with pytest.raises(ValueError, match="no class sub-directory"):
        load_image_folder(tmp_path / "imgs" / "cat")


def _cifar10_python(root, n=20):
    root.mkdir()
    x, y = _images(n, 0), (np.arange(n) % 10).tolist()
    flat = x.transpose(0, 3, 1, 2).reshape(n, -1)
    for i in range(1, 6):
        with open(root / f"data_batch_{i}", "wb") as fh:
            pickle.dump({b"data": flat, b"labels": y, b"batch_label": b"training batch"}, fh, protocol=2)
    with open(root / "test_batch", "wb") as fh:
        pickle.dump({b"data": flat[:10], b"labels": y[:10]}, fh, protocol=2)
    with open(root / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, fh, protocol=2)
    return x, y


def test_cifar_python_and_binary_versions_agree(tmp_path):
    x, y = _cifar10_python(tmp_path / "cifar-10-batches-py")
    py = load_cifar(tmp_path / "cifar-10-batches-py", "train")
    assert py.images.shape == (100, 32, 32, 3) and py.classes[3] == "c3"
    assert np.array_equal(py.images[:20], x) and py.labels[:20].tolist() == y
    b = tmp_path / "cifar-10-batches-bin"
    b.mkdir()
    rec = np.concatenate([np.array(y, dtype=np.uint8)[:, None], x.transpose(0, 3, 1, 2).reshape(20, -1)], 1)
    for i in range(1, 6):
        rec.tofile(b / f"data_batch_{i}.bin")
    rec[:10].tofile(b / "test_batch.bin")
    (b / "batches.meta.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n")
    binary = load_cifar(b, "train")
    assert np.array_equal(binary.images, py.images) and np.array_equal(binary.labels, py.labels)
    assert load_cifar(b, "test").images.shape == (10, 32, 32, 3)
    # CIFAR-100 python: fine labels
    c100 = tmp_path / "cifar-100-python"
    c100.mkdir()
    for split, n in (("train", 12), ("test", 4)):
        with open(c100 / split, "wb") as fh:
            pickle.dump({b"data": x[:n].transpose(0, 3, 1, 2).reshape(n, -1), b"fine_labels": list(range(n)),
                         b"coarse_labels": [0] * n}, fh)
    with open(c100 / "meta", "wb") as fh:
        pickle.dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)]}, fh)
    d = load_cifar(c100, "test")
    assert d.labels.tolist() == [0, 1, 2, 3] and len(d.classes) == 100
    (b / "test_batch.bin").write_bytes(rec[:3].tobytes()[:-7])
    with pytest.raises(ValueError, match="truncated"):
        load_cifar(b, "test")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo owned > /dev/null",))


def test_a_hostile_cifar_pickle_is_refused(tmp_path):
    _cifar10_python(tmp_path / "c")
    with open(tmp_path / "c" / "test_batch", "wb") as fh:
        pickle.dump({b"data": _Evil(), b"labels": [0]}, fh)
    with pytest.raises(UnsafePickleError, match="refusing to unpickle"):
        load_cifar(tmp_path / "c", "test")


def test_hf_dataset_saved_to_disk(tmp_path):
    from datasets import ClassLabel, Dataset, DatasetDict, Features
    from datasets import Image as HFImage

    feats = Features({"img": HFImage(), "label": ClassLabel(names=["a", "b", "c"])})
    imgs = [Image.fromarray(a) for a in _images(9, 1, 16, 16)]
    ds = DatasetDict({"train": Dataset.from_dict({"img": imgs, "label": [0, 1, 2] * 3}, features=feats),
                      "test": Dataset.from_dict({"img": imgs[:3], "label": [0, 1, 2]}, features=feats)})
    ds.save_to_disk(str(tmp_path / "hf"))
    d = load_hf_image_dataset(tmp_path / "hf", "train", image_column="img")
    assert d.classes == ["a", "b", "c"] and len(d.images) == 9 and d.images[0].shape == (16, 16, 3)
    assert np.array_equal(d.images[0], np.asarray(imgs[0]))
    with pytest.raises(ValueError, match="splits"):
        load_hf_image_dataset(tmp_path / "hf", "validation")
    with pytest.raises(ValueError, match="no column 'image'"):
        load_hf_image_dataset(tmp_path / "hf", "train")


def test_stream_files_in_yaml_and_json(tmp_path):
    _folder(tmp_path / "imgs", per=10)
    (tmp_path / "s.yaml").write_text("name: pets\ndataset: {format: image-folder, path: imgs}\nclasses_per_task: 2\n"
                                     "seed: 3\ntrain_per_class: 6\ntest_per_class: 4\nimage_size: 28\n")
    s = load_stream_file(tmp_path / "s.yaml")
    assert s.name == "pets" and [t.name for t in s] == ["pets-1", "pets-2"] and s.scenario == "cil" and s.image_size == 28
    assert sorted(c for t in s for c in t.classes) == ["cat", "dog", "fox", "owl"]
    assert all(len(t.train_inputs) == 12 and len(t.test_inputs) == 8 for t in s)
    again = load_stream_file(tmp_path / "s.yaml")
    assert [t.classes for t in again] == [t.classes for t in s]
    other = load_stream_file(tmp_path / "s.yaml", seed=4)
    assert other.seed == 4
    (tmp_path / "t.json").write_text(json.dumps({"dataset": {"format": "image-folder", "path": str(tmp_path / "imgs")},
                                                 "tasks": [["owl", "cat"], ["dog", "fox"]], "scenario": "til"}))
    t = load_stream_file(tmp_path / "t.json")
    assert [x.classes for x in t] == [["owl", "cat"], ["dog", "fox"]] and t.scenario == "til"
    from sharecl.data.streams import get_stream

    assert [x.name for x in get_stream(str(tmp_path / "t.json"), seed=1)] == ["t-1", "t-2"]
    (tmp_path / "bad.json").write_text(json.dumps({"dataset": {"format": "image-folder", "path": "imgs"}, "tasks": [["cow", "cat"]]}))
    with pytest.raises(ValueError, match="'cow' is not in the dataset"):
        load_stream_file(tmp_path / "bad.json")
    (tmp_path / "bad2.json").write_text(json.dumps({"dataset": {"format": "zip", "path": "imgs"}}))
    with pytest.raises(ValueError, match="image-folder, cifar or hf-disk"):
        load_stream_file(tmp_path / "bad2.json")
    (tmp_path / "bad3.json").write_text(json.dumps({"datset": {}}))
    with pytest.raises(ValueError, match="unknown keys"):
        load_stream_file(tmp_path / "bad3.json")
