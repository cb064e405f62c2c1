"""The store: exact reload, atomic writes, and refusal of damaged or hostile files."""

import json
import os
import pickle
import re
import threading
from pathlib import Path

import pytest
import torch

from conftest import make_task
from sharecl.store import StoreError, StoreLockedError, load_store, read_manifest, save_store, store_lock, store_records, store_tasks


@pytest.fixture
def store_dir(tiny_share, fast_cfg, tmp_path):
    tiny_share.learn(make_task("a"), fast_cfg, progress=False)
    tiny_share.learn(make_task("b", seed=1), fast_cfg, progress=False)
    save_store(tiny_share, tmp_path / "store")
    return tmp_path / "store"


def test_reload_reproduces_predictions_exactly(tiny_share, store_dir):
    loaded = load_store(store_dir)
    for name in ("a", "b"):
        xs = make_task(name, seed=0 if name == "a" else 1).test_inputs
        assert torch.equal(loaded.logits(xs, name), tiny_share.logits(xs, name))
    assert loaded.task_names == ["a", "b"] and loaded.config == tiny_share.config
    m = read_manifest(store_dir)
    assert m["version"] == 1 and m["base_model"]["sha256"] and m["library_versions"]["torch"]
    assert [t["classes"] for t in store_tasks(store_dir)] == [tiny_share.task_classes["a"], tiny_share.task_classes["b"]]
    assert m["task_count"] == 2 and "tasks" not in m  # the manifest does not grow with the tasks


def test_new_version_appends_a_log_file_and_a_checkpoint_replaces_old_files(tiny_share, store_dir, fast_cfg):
    first = read_manifest(store_dir)["files"]["state"]
    tiny_share.learn(make_task("c", seed=2), fast_cfg, progress=False)
    m = save_store(tiny_share, store_dir, compact=False)
    assert m["files"]["state"] == first and len(m["files"]["log"]) == 1  # the checkpoint is not rewritten
    log = m["files"]["log"][0]["name"]
    assert re.fullmatch(r"log-v2-[0-9a-f]{16}\.safetensors", log)
    assert sorted(os.listdir(store_dir)) == sorted([".lock", "manifest.json", first["name"], log])
    tiny_share.learn(make_task("d", seed=3), fast_cfg, progress=False)
    m = save_store(tiny_share, store_dir, compact=True)
    state = m["files"]["state"]["name"]
    assert re.fullmatch(r"state-v3-[0-9a-f]{16}\.safetensors", state) and m["files"]["log"] == []
    assert sorted(os.listdir(store_dir)) == [".lock", "manifest.json", state]


def test_failed_manifest_write_leaves_previous_version_loadable(tiny_share, store_dir, fast_cfg, monkeypatch):
    tiny_share.learn(make_task("c", seed=2), fast_cfg, progress=False)
    real_replace = os.replace

    def boom(src, dst):
        if str(dst).endswith("manifest.json"):
            raise OSError("simulated crash before the manifest rename")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        save_store(tiny_share, store_dir)
    monkeypatch.setattr(os, "replace", real_replace)
    loaded = load_store(store_dir)
    assert loaded.task_names == ["a", "b"] and read_manifest(store_dir)["version"] == 1
    save_store(tiny_share, store_dir)  # the debris does not break the next write
    assert load_store(store_dir).task_names == ["a", "b", "c"]


def _state_file(store_dir):
    return store_dir / read_manifest(store_dir)["files"]["state"]["name"]


def test_truncated_state_file_is_refused(store_dir):
    f = _state_file(store_dir)
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(StoreError, match="sha256"):
        load_store(store_dir)


def test_bit_flipped_state_file_is_refused(store_dir):
    f = _state_file(store_dir)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="sha256"):
        load_store(store_dir)


class _Payload:
    """Unpickling this writes a marker file: proof that something was unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_in_place_of_tensors_is_refused(store_dir, tmp_path):
    marker = tmp_path / "unpickled"
    _state_file(store_dir).write_bytes(pickle.dumps({"U": _Payload(marker)}))
    with pytest.raises(StoreError, match="sha256"):
        load_store(store_dir)
    assert not marker.exists()


def test_pickle_whose_checksum_matches_the_manifest_is_refused_unread(store_dir, tmp_path):
    """A tampered store whose manifest carries the pickle's own sha256: the checksum passes, and
    the file is still never unpickled (safetensors only)."""
    import hashlib

    marker = tmp_path / "unpickled"
    payload = pickle.dumps({"U": _Payload(marker)})
    f = _state_file(store_dir)
    f.write_bytes(payload)
    mf = store_dir / "manifest.json"
    m = json.loads(mf.read_text())
    m["files"]["state"]["sha256"] = hashlib.sha256(payload).hexdigest()
    mf.write_text(json.dumps(m))
    with pytest.raises(StoreError, match="cannot read"):
        load_store(store_dir)
    assert not marker.exists()


def test_wrong_format_version_is_refused(store_dir):
    mf = store_dir / "manifest.json"
    m = json.loads(mf.read_text())
    m["format_version"] = 99
    mf.write_text(json.dumps(m))
    with pytest.raises(StoreError, match="format_version 99"):
        load_store(store_dir)


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "state-v1.safetensors/../../x"])
def test_manifest_pointing_outside_is_refused(store_dir, name):
    mf = store_dir / "manifest.json"
    m = json.loads(mf.read_text())
    m["files"]["state"]["name"] = name
    mf.write_text(json.dumps(m))
    with pytest.raises(StoreError, match="tampered"):
        load_store(store_dir)


def test_different_base_model_is_refused(store_dir, tmp_path, tiny_model_dir):
    import shutil

    from safetensors.torch import load_file, save_file

    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    w = load_file(str(other / "model.safetensors"))
    k = next(iter(w))
    w[k] = w[k] + 1
    save_file(w, str(other / "model.safetensors"))
    with pytest.raises(StoreError, match="differs from the one this store was built on"):
        load_store(store_dir, model_path=str(other))


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="not a sharecl store"):
        load_store(tmp_path)


def test_second_writer_is_refused(tmp_path):
    errors = []

    def other_writer():
        try:
            with store_lock(tmp_path / "s"):
                pass
        except StoreLockedError as exc:
            errors.append(str(exc))

    with store_lock(tmp_path / "s"):
        with store_lock(tmp_path / "s"):  # the same thread again: re-entrant
            th = threading.Thread(target=other_writer)
            th.start()
            th.join()
    assert len(errors) == 1 and "another process" in errors[0]


@pytest.mark.parametrize("name,config", [("inflora", {"r": 4}), ("sd-lora", {"r": 4, "lora_alpha": 8}),
                                         ("sd-lora-kd", {"r": 4, "lora_alpha": 8}), ("dual-lora", {"r": 4, "residual_rank": 2})])
def test_peer_stores_reload_exactly_and_keep_learning(name, config, tiny_model_dir, fast_cfg, tmp_path):
    import torch

    from conftest import make_task
    from sharecl.backbone import load_encoder
    from sharecl.methods import build_method

    m = build_method(name, load_encoder(tiny_model_dir, max_length=16), seed=0, **config)
    tasks = [make_task("a"), make_task("b", seed=1)]
    for t in tasks:
        m.learn(t, fast_cfg, progress=False)
    save_store(m, tmp_path / "s")
    same = load_store(tmp_path / "s")
    assert same.name == name and same.task_names == ["a", "b"]
    xs = tasks[0].test_inputs + tasks[1].test_inputs
    for t in ("a", "b"):
        assert torch.equal(same.logits(xs, t), m.logits(xs, t))
    assert torch.equal(same.cil_logits(xs), m.cil_logits(xs))
    third = make_task("c", seed=2)
    m.learn(third, fast_cfg, progress=False)
    same.learn(third, fast_cfg, progress=False)  # continuing from the store = continuing in memory
    assert torch.allclose(same.logits(xs, "c"), m.logits(xs, "c"), atol=1e-5)
    assert save_store(same, tmp_path / "s")["version"] == 2


def test_a_store_keeps_its_method(tiny_share, store_dir, tiny_model_dir):
    from sharecl.backbone import load_encoder
    from sharecl.methods import build_method

    with pytest.raises(StoreError, match="holds method 'share'"):
        save_store(build_method("inflora", load_encoder(tiny_model_dir, max_length=16)), store_dir)
    with pytest.raises(StoreError, match="no store format"):
        save_store(build_method("seq-lora", load_encoder(tiny_model_dir, max_length=16)), store_dir)


def test_manifest_keeps_merge_summaries_and_the_last_per_task_drift(tiny_share, fast_cfg, tmp_path):
    for i, name in enumerate("abc"):
        tiny_share.learn(make_task(name, seed=i), fast_cfg, progress=False)
    save_store(tiny_share, tmp_path / "s")
    merges = store_records(tmp_path / "s")[1]
    assert len(merges) == 3 and all("per_task" not in m for m in merges)
    full = tiny_share.drift[1]["per_task"]["a"]
    assert merges[1]["worst_task"] == "a" and merges[1]["drift_max"] == full["max"] and merges[1]["k"] == tiny_share.drift[1]["k"]
    assert read_manifest(tmp_path / "s")["last_merge"]["drift_max"] == max(v["max"] for v in tiny_share.drift[2]["per_task"].values())
    loaded = load_store(tmp_path / "s")
    assert loaded.drift[-1]["per_task"] == tiny_share.drift[-1]["per_task"]  # the last merge in full, the others summarised
    assert "per_task" not in loaded.drift[1]
    for compact in (False, True):  # appended to the log, and folded into a checkpoint
        name = "de"[compact]
        loaded.learn(make_task(name, seed=3 + compact), fast_cfg, progress=False)  # learning goes on from the records
        save_store(loaded, tmp_path / "s", compact=compact)
        again = load_store(tmp_path / "s")
        assert set(again.drift[-1]["per_task"]) == set(again.task_names[:-1])
        for t, v in loaded.drift[-1]["per_task"].items():  # float32 on disk
            assert again.drift[-1]["per_task"][t]["max"] == pytest.approx(v["max"], rel=1e-6, abs=1e-12)
        assert [m["after_task"] for m in store_records(tmp_path / "s")[1]] == list("abc") + list("de"[: compact + 1])


def test_save_store_takes_the_lock_itself(tiny_share, store_dir, fast_cfg):
    """A second writer through the Python API (another thread or process) is refused while the
    lock is held, and the store is unchanged; the holder itself may save (re-entrant)."""
    tiny_share.learn(make_task("c", seed=2), fast_cfg, progress=False)
    before = (store_dir / "manifest.json").read_bytes()
    held, release = threading.Event(), threading.Event()

    def holder():
        with store_lock(store_dir):
            held.set()
            release.wait(30)

    th = threading.Thread(target=holder)
    th.start()
    try:
        assert held.wait(30)
        with pytest.raises(StoreLockedError):
            save_store(tiny_share, store_dir)
        assert (store_dir / "manifest.json").read_bytes() == before
    finally:
        release.set()
        th.join()
    with store_lock(store_dir):
        assert save_store(tiny_share, store_dir)["version"] == 2  # re-entrant in the holding thread


def test_state_file_names_are_never_reused(tiny_share, store_dir, fast_cfg):
    """A file another writer could be writing under the old naming (or any unnamed state file) is
    never the one the manifest points at, and the reload is exact."""
    (store_dir / "state-v2.safetensors").write_bytes(b"another writer's half-written file")
    tiny_share.learn(make_task("c", seed=2), fast_cfg, progress=False)
    m = save_store(tiny_share, store_dir)
    named = [m["files"]["state"]["name"], *(e["name"] for e in m["files"]["log"])]
    assert "state-v2.safetensors" not in named
    xs = make_task("c", seed=2).test_inputs
    assert torch.equal(load_store(store_dir).logits(xs, "c"), tiny_share.logits(xs, "c"))
    assert sorted(f.name for f in store_dir.iterdir()) == sorted([".lock", "manifest.json", *named])


def test_a_version_on_another_base_model_is_refused(store_dir, tmp_path, tiny_model_dir, fast_cfg):
    import shutil

    from safetensors.torch import load_file, save_file

    from sharecl.backbone import load_encoder
    from sharecl.methods.share import ShareMethod

    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    w = load_file(str(other / "model.safetensors"))
    k = next(iter(w))
    w[k] = w[k] * 1.5
    save_file(w, str(other / "model.safetensors"))
    m = ShareMethod(load_encoder(str(other), max_length=16), seed=0, r=4, lora_alpha=8, p=2, k=4, phi=2)
    m.learn(make_task("a"), fast_cfg, progress=False)
    before = (store_dir / "manifest.json").read_bytes()
    with pytest.raises(StoreError, match="was built on the base model .* save it to another directory"):
        save_store(m, store_dir)
    assert (store_dir / "manifest.json").read_bytes() == before


def test_the_manifest_records_what_results_depend_on(store_dir):
    import platform

    env = read_manifest(store_dir)["environment"]
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and env["machine"] == platform.machine()
    assert env["threads"] == torch.get_num_threads()  # the store was written in this process
    cfg = torch.__config__.show()
    assert env["blas"].split()[0].lower() in cfg.lower()  # the BLAS torch was built with names the one recorded
    if Path("/proc/cpuinfo").exists():
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")]
        assert not names or env["cpu"] == names[0]


def test_a_store_path_that_is_a_file_is_refused_clearly(tiny_share, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(StoreError, match="is a file, not a store directory"):
        save_store(tiny_share, f)
