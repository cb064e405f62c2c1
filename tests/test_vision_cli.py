"""Images through the command line: `sharecl learn` from an image folder, a `datasets` directory
and a stream file; `sharecl predict` on image files; training-time augmentation."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_task, sharecl_in_process, write_csv
from sharecl.data.image_files import image_source_kind, load_image_task
from sharecl.vision.transforms import augment_array


def _shade(rng, bright: bool, h=28, w=28):
    return rng.integers(155, 256, (h, w), dtype=np.uint8) if bright else rng.integers(0, 100, (h, w), dtype=np.uint8)


def _folder(root, n=12, seed=0, names=("dark", "bright")):
    """root/<class>/*.png: class 0 dark, class 1 bright (learnable from the pixels)."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for j in range(n):
            Image.fromarray(_shade(rng, c == 1)).save(root / name / f"{j}.png")
    return root


def test_image_source_kind_tells_images_from_text(tmp_path):
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as HFImage

    _folder(tmp_path / "folder")
    _folder(tmp_path / "split" / "train")
    _folder(tmp_path / "split" / "test", n=2)
    feats = Features({"image": HFImage(), "label": ClassLabel(names=["x", "y"])})
    Dataset.from_dict({"image": [Image.new("RGB", (8, 8))] * 2, "label": [0, 1]}, features=feats).save_to_disk(str(tmp_path / "hf"))
    Dataset.from_dict({"text": ["a b", "c d"], "label": [0, 1]}).save_to_disk(str(tmp_path / "hf-text"))
    (tmp_path / "s.yaml").write_text("dataset: {format: image-folder, path: folder}\n")
    (tmp_path / "s.json").write_text(json.dumps({"dataset": {"format": "image-folder", "path": "folder"}}))
    (tmp_path / "rows.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    (tmp_path / "rows.json").write_text('[{"text": "a", "label": 0}]')
    write_csv(tmp_path / "t.csv", make_task("t"))
    kinds = {p: image_source_kind(tmp_path / p) for p in ("folder", "split", "hf", "hf-text", "s.yaml", "s.json",
                                                             "rows.jsonl", "rows.json", "t.csv", "missing")}
    assert kinds == {"folder": "image-folder", "split": "image-folder", "hf": "hf-disk", "hf-text": None,
                     "s.yaml": "stream-file", "s.json": "stream-file", "rows.jsonl": None, "rows.json": None,
                     "t.csv": None, "missing": None}
    task, size = load_image_task(tmp_path / "split", "pair")
    assert size is None and task.classes == ["bright", "dark"] and len(task.test_inputs) == 4 and len(task.train_inputs) == 24
    with pytest.raises(ValueError, match="holds no images"):
        load_image_task(tmp_path / "t.csv", "x")
    with pytest.raises(ValueError, match="declares tasks s-1; pass one of them"):
        load_image_task(tmp_path / "s.yaml", "nope")


def test_learn_and_predict_images_from_a_folder_a_dataset_and_a_stream_file(tiny_vit_dir, tmp_path):
    from datasets import ClassLabel, Dataset, DatasetDict, Features
    from datasets import Image as HFImage

    store = tmp_path / "store"
    folder = _folder(tmp_path / "shades")
    common = ["--steps", 30, "--batch-size", 8, "--lr", 1e-2, "-r", 4, "--k", 4, "--no-progress"]
    out = sharecl_in_process("learn", store, "--task", "shades", "--data", folder, "--model", tiny_vit_dir, "--image-size", 28, *common).stdout
    assert "learned shades (2 classes" in out and "store version 1" in out
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["image_size"] == 28

    rng = np.random.default_rng(5)  # a second task from a DatasetDict with its own test split: dark vs bright, inverted names
    feats = Features({"image": HFImage(), "label": ClassLabel(names=["light", "night"])})
    def split(n):
        imgs = [Image.fromarray(_shade(rng, i % 2 == 0)) for i in range(n)]
        return Dataset.from_dict({"image": imgs, "label": [i % 2 for i in range(n)]}, features=feats)
    DatasetDict({"train": split(24), "test": split(6)}).save_to_disk(str(tmp_path / "hf"))
    out = sharecl_in_process("learn", store, "--task", "sky", "--data", tmp_path / "hf", *common).stdout
    assert "learned sky (2 classes, 24 train)" in out and "on 6 examples" in out

    (tmp_path / "pets.yaml").write_text("name: pets\ndataset: {format: image-folder, path: shades}\nclasses_per_task: 2\n"
                                        "scenario: til\nimage_size: 28\n")
    sharecl_in_process("learn", store, "--task", "pets-1", "--data", tmp_path / "pets.yaml", "--augment", *common)

    probe = _folder(tmp_path / "probe", n=2, seed=9)
    files = sorted(str(p) for p in probe.rglob("*.png"))  # bright/0, bright/1, dark/0, dark/1
    got = [json.loads(line) for line in sharecl_in_process("predict", store, *files, "--task", "shades", "--json").stdout.splitlines()]
    assert [g["image"] for g in got] == files and [g["label"] for g in got] == ["bright", "bright", "dark", "dark"]
    got = [json.loads(line) for line in sharecl_in_process("predict", store, *files, "--task", "sky", "--json").stdout.splitlines()]
    assert [g["label"] for g in got] == ["light", "light", "night", "night"]

    before = (store / "manifest.json").read_bytes()
    bad = sharecl_in_process("learn", store, "--task", "words", "--data", write_csv(tmp_path / "w.csv", make_task("w")), *common, check=False)
    assert bad.returncode == 1 and "holds text classification data but" in bad.stderr and "image classification tasks" in bad.stderr
    bad = sharecl_in_process("learn", store, "--task", "pets-9", "--data", tmp_path / "pets.yaml", *common, check=False)
    assert bad.returncode == 1 and "declares tasks pets-1" in bad.stderr
    bad = sharecl_in_process("predict", store, str(tmp_path / "nope.png"), "--task", "shades", check=False)
    assert bad.returncode == 1 and "does not exist" in bad.stderr
    assert (store / "manifest.json").read_bytes() == before  # refused input changed nothing


def test_images_into_a_text_store_are_refused(cli_store, tmp_path):
    before = (cli_store / "store" / "manifest.json").read_bytes()
    bad = sharecl_in_process("learn", cli_store / "store", "--task", "pics", "--data", _folder(tmp_path / "pics"), "--no-progress", check=False)
    assert bad.returncode == 1 and "holds image classification data but" in bad.stderr and "--model" in bad.stderr
    assert (cli_store / "store" / "manifest.json").read_bytes() == before


def test_augmentation_is_seeded_keeps_shapes_and_changes_training(tiny_vit_dir):
    rng = np.random.default_rng(0)
    grey, rgb = _shade(rng, True, 28, 28), rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    a = [augment_array(x, np.random.default_rng(1)) for x in (grey, rgb)]
    assert a[0].shape == (28, 28) and a[1].shape == (20, 20, 3) and a[0].dtype == np.uint8
    assert np.array_equal(augment_array(rgb, np.random.default_rng(1)), a[1])
    assert not np.array_equal(augment_array(rgb, np.random.default_rng(2)), a[1])

    from sharecl.backbone import load_encoder
    from sharecl.data.image_files import load_image_task
    from sharecl.methods.share import ShareMethod
    from sharecl.train import TrainConfig

    def losses(augment, tmp):
        task, _ = load_image_task(_folder(tmp), "t")
        m = ShareMethod(load_encoder(tiny_vit_dir, image_size=28), seed=0, r=4, lora_alpha=8, p=2, k=4, phi=2)
        return m.learn(task, TrainConfig(steps=4, batch_size=8, augment=augment), progress=False)["final_loss"]

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        plain, aug1, aug2 = losses(False, Path(d) / "a"), losses(True, Path(d) / "b"), losses(True, Path(d) / "c")
    assert aug1 == aug2 and aug1 != plain
    with pytest.raises(ValueError, match="augment applies to images"):
        from sharecl.train import train_steps

        p = torch.nn.Parameter(torch.zeros(1))
        train_steps(lambda xs, ys, reduction: (p.sum(), torch.tensor(1.0)), [{"params": [p]}], make_task("t"),
                    TrainConfig(steps=1, lr=1e-3, augment=True))


@pytest.mark.slow
def test_learn_from_a_folder_of_real_fashion_mnist_pngs_with_the_packaged_vit(tmp_path):
    """Real images written as PNG files, the packaged DINOv2 chosen by default, augmentation on."""
    from sharecl.data.images import fashion_mnist

    x, y = fashion_mnist("train")
    for label, name in ((1, "trouser"), (8, "bag")):
        (tmp_path / "shop" / name).mkdir(parents=True)
        for j, i in enumerate(np.flatnonzero(y == label)[:40]):
            Image.fromarray(x[i]).save(tmp_path / "shop" / name / f"{j}.png")
    store = tmp_path / "store"
    out = sharecl_in_process("learn", store, "--task", "shop", "--data", tmp_path / "shop", "--steps", 30, "--augment", "--no-progress").stdout
    acc = float(out.split("held-out accuracy ")[1].split("%")[0])
    assert "(2 classes, 64 train)" in out and acc >= 90.0, out
    manifest = json.loads((store / "manifest.json").read_text())
    assert "dinov2" in manifest["base_model"]["path"] and manifest["image_size"] == 56
    xt, yt = fashion_mnist("test")  # unseen images, as files
    probe, truth = [], []
    for label, name in ((1, "trouser"), (8, "bag")):
        for i in np.flatnonzero(yt == label)[:4]:
            probe.append(tmp_path / f"probe-{i}.png")
            Image.fromarray(xt[i]).save(probe[-1])
            truth.append(name)
    got = [json.loads(line)["label"] for line in sharecl_in_process("predict", store, *probe, "--task", "shop", "--json").stdout.splitlines()]
    assert sum(g == t for g, t in zip(got, truth)) >= 7, (got, truth)
