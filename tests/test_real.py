"""The packaged real model (all-MiniLM-L6-v2) on packaged real data (text5 tasks)."""

import pytest
import torch

from sharecl.backbone import load_encoder
from sharecl.data.streams import get_stream
from sharecl.interop.peft import export_task
from sharecl.methods import build_method
from sharecl.store import load_store, save_store
from sharecl.train import TrainConfig, evaluate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_real_tasks():
    s = get_stream("text5", seed=0, train_per_class=24, test_per_class=10)
    return [s.tasks[0], s.tasks[4]]  # BBC topic, fortune language


@pytest.fixture(scope="module")
def real_share(two_real_tasks):
    torch.manual_seed(0)
    m = build_method("share", load_encoder(max_length=48), seed=0, p=2, k=4)
    cfg = TrainConfig(steps=25, batch_size=16, max_length=48)
    accs = []
    for t in two_real_tasks:
        m.learn(t, cfg, progress=False)
        accs.append([evaluate(lambda xs, n=u.name: m.logits(xs, n), u, 64) for u in two_real_tasks[: len(accs) + 1]])
    return m, accs


def test_share_learns_real_tasks_without_forgetting(real_share, two_real_tasks):
    m, accs = real_share
    assert accs[0][0] > 0.6 and accs[1][1] > 0.6  # 5 classes each: chance is 0.2
    assert abs(accs[1][0] - accs[0][0]) <= 0.02  # k = T·p: the merge truncates nothing
    assert m.adapter_numbers_per_task() == 12 * (4 + 4) * 2  # 12 layers (query, value) × (k_B + k_A) × p


def test_real_export_reproduces_outputs_in_peft(real_share, two_real_tasks, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    m, _ = real_share
    out = export_task(m, "fortune-language", tmp_path / "exp")
    batch = m.encoder.tokenize(two_real_tasks[1].test_inputs[:8])
    with m.task(m.task_names[1]):
        with torch.no_grad():
            want = m.encoder.model(**batch).last_hidden_state
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(m.encoder.path), str(out)).eval()
    with torch.no_grad():
        got = peft_model(**batch).last_hidden_state
    assert (got - want).abs().max().item() <= 1e-5


def test_real_store_round_trip(real_share, two_real_tasks, tmp_path):
    m, _ = real_share
    save_store(m, tmp_path / "store")
    loaded = load_store(tmp_path / "store")
    xs = two_real_tasks[0].test_inputs[:16]
    assert torch.equal(loaded.logits(xs, "bbc-topic"), m.logits(xs, "bbc-topic"))


def test_lora_baselines_run_on_the_real_model(two_real_tasks):
    cfg = TrainConfig(steps=10, batch_size=16, max_length=48)
    for name in ("lora-per-task", "seq-lora"):
        m = build_method(name, load_encoder(max_length=48), seed=0)
        m.learn(two_real_tasks[0], cfg, progress=False)
        assert evaluate(lambda xs, m=m: m.logits(xs, "bbc-topic"), two_real_tasks[0], 64) > 0.4
    assert m.shared_numbers() == 12 * 8 * (384 + 384)


@pytest.mark.parametrize("name", ["inflora", "sd-lora", "dual-lora", "joint-lora"])
def test_peer_methods_learn_two_real_class_incremental_tasks(name):
    """A short run of each peer on two wordnet-cil tasks with the real MiniLM: both tasks
    are learned (task-incremental accuracy far above chance) and class-incremental scores
    cover all 8 classes."""
    from sharecl.runner import evaluate_cil

    s = get_stream("wordnet-cil", seed=0, train_per_class=24, test_per_class=10)
    tasks = s.tasks[:2]
    m = build_method(name, load_encoder(max_length=48), seed=0)
    m.begin_stream(2)
    cfg = TrainConfig(steps=15, batch_size=16, max_length=48)
    if name == "joint-lora":
        m.learn_all(tasks, cfg, "cil", progress=False)
    else:
        for t in tasks:
            m.learn(t, cfg, progress=False)
    til = [evaluate(lambda xs, n=t.name: m.logits(xs, n), t, 64) for t in tasks]
    assert min(til) > 0.5, til  # chance is 0.25
    assert m.cil_logits(tasks[0].test_inputs[:4]).shape == (4, 8)
    offsets = m.class_offsets()
    cil = [evaluate_cil(m, t, offsets[t.name], 64) for t in tasks]
    assert sum(cil) / 2 > 0.25, cil  # chance is 0.125
