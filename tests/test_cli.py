"""The command line end to end on the tiny model: store commands, user errors, killed writers."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import learn_b, make_task, sharecl, sharecl_in_process, write_csv
from sharecl.store import load_store, read_manifest, store_class_statistics, store_tasks


@pytest.mark.multiprocess
def test_learn_predict_info_export(cli_store, tmp_path):
    """Every store command in process (typer's CliRunner), and one `predict` through a fresh interpreter."""
    store = tmp_path / "store"
    shutil.copytree(cli_store / "store", store)
    out = sharecl_in_process(*learn_b(store, tmp_path))
    assert "learned b" in out.stdout and "store version 2" in out.stdout
    pred = sharecl_in_process("predict", store, "--task", "b", "--json", "the apple", "a violin")
    rows = [json.loads(line) for line in pred.stdout.strip().splitlines()]
    assert len(rows) == 2 and all(r["label"] in make_task("b", seed=1).classes for r in rows)
    info = sharecl_in_process("info", store).stdout
    assert "2 task(s)" in info and "largest old-task drift" in info and "own truncation of a task to p=" in info
    sharecl_in_process("export", store, tmp_path / "exp", "--task", "a")
    assert (tmp_path / "exp" / "adapter_model.safetensors").exists()
    refused = sharecl_in_process("add-adapter", store, tmp_path / "exp", "--task", "a2", check=False)
    assert refused.returncode == 1 and "has rank 2" in refused.stderr and "--any-rank" in refused.stderr
    folded = sharecl_in_process("add-adapter", store, tmp_path / "exp", "--task", "a2", "--any-rank").stdout
    assert "its own truncation to p" in folded
    assert [t["kind"] for t in store_tasks(store)] == ["data", "data", "adapter"]
    sharecl_in_process("export", store, tmp_path / "exp-b", "--task", "b")
    mismatched = sharecl_in_process("add-adapter", store, tmp_path / "exp", tmp_path / "exp-b", "--task", "a3", check=False)
    assert mismatched.returncode == 1 and "one --task per adapter" in mismatched.stderr
    batch = sharecl_in_process("add-adapter", store, tmp_path / "exp", tmp_path / "exp-b", "--task", "a3", "--task", "b3",
                               "--any-rank").stdout  # two adapters, one batch: one truncation
    assert batch.count("its own truncation to p") == 2 and "largest drift of an old task" in batch
    assert [t["kind"] for t in store_tasks(store)] == ["data", "data", "adapter", "adapter", "adapter"]
    asked = ("predict", store, "--task", "b", "--json", "the apple", "a violin")
    before, version = sharecl_in_process(*asked).stdout, read_manifest(store)["version"]
    out = sharecl_in_process("compact", store).stdout
    m = read_manifest(store)
    assert m["files"]["log"] == [] and m["version"] == version + ("folded" in out)
    # folding the log changes no prediction, and `sharecl` in a fresh interpreter answers as the in-process runs did
    assert sharecl(*asked).stdout == before
    no_head = sharecl_in_process("predict", store, "--task", "a2", "x", check=False)
    assert no_head.returncode == 1 and "no classification head" in no_head.stderr


@pytest.mark.parametrize("case", ["unknown-task", "duplicate", "empty", "no-label-column", "missing-file", "bad-name"])
def test_user_errors_exit_nonzero_and_leave_store_unchanged(cli_store, tmp_path, case):
    store = cli_store / "store"
    before = (store / "manifest.json").read_bytes()
    if case == "unknown-task":
        p = sharecl_in_process("predict", store, "--task", "nope", "hello", check=False)
        expect = "unknown task 'nope'"
    elif case == "duplicate":
        p = sharecl_in_process("learn", store, "--task", "a", "--data", cli_store / "a.csv", check=False)
        expect = "already exists"
    elif case == "empty":
        (tmp_path / "e.csv").write_text("")
        p = sharecl_in_process("learn", store, "--task", "e", "--data", tmp_path / "e.csv", check=False)
        expect = "is empty"
    elif case == "no-label-column":
        (tmp_path / "n.csv").write_text("text,topic\nhello,x\nworld,y\n")
        p = sharecl_in_process("learn", store, "--task", "n", "--data", tmp_path / "n.csv", check=False)
        expect = "lacks column(s) ['label']"
    elif case == "missing-file":
        p = sharecl_in_process("learn", store, "--task", "m", "--data", tmp_path / "none.csv", check=False)
        expect = "does not exist"
    else:
        p = sharecl_in_process("learn", store, "--task", "bad/name", "--data", cli_store / "a.csv", check=False)
        expect = "invalid task name"
    assert p.returncode == 1, p.stdout + p.stderr
    assert expect in " ".join(p.stderr.split()), p.stderr
    assert "Traceback" not in p.stderr
    assert (store / "manifest.json").read_bytes() == before


@pytest.mark.multiprocess
def test_killed_learn_leaves_a_loadable_store(cli_store, tmp_path):
    """SIGKILL `learn` at random instants; the store always loads at version 1 or 2."""
    rng = random.Random(0)
    store = tmp_path / "store"
    seen = set()
    relearned = False
    for delay in (0.5, 3.0, 5.0, 7.0, 9.0):  # from start-up, through training, to the write
        if store.exists():
            shutil.rmtree(store)
        shutil.copytree(cli_store / "store", store)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "sharecl", *map(str, learn_b(store, tmp_path))],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        time.sleep(delay + rng.uniform(0.0, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        m = load_store(store)
        version = read_manifest(store)["version"]
        assert (version, m.task_names) in [(1, ["a"]), (2, ["a", "b"])]
        seen.add(version)
        # the next writer is not hindered by debris
        if version == 1 and not relearned:
            relearned = True
            sharecl_in_process(*learn_b(store, tmp_path))
            assert load_store(store).task_names == ["a", "b"]
    assert 1 in seen


def test_compare_rejects_bad_seeds_and_methods(tmp_path):
    from typer.testing import CliRunner

    from sharecl.cli import app

    r = CliRunner().invoke(app, ["compare", "--seeds", "0,x", "--out", str(tmp_path / "c")])
    assert r.exit_code == 1 and "--seeds must be comma-separated integers" in r.output
    r = CliRunner().invoke(app, ["compare", "--methods", "share,nope", "--out", str(tmp_path / "c")])
    assert r.exit_code == 1 and "unknown method" in r.output
    assert not (tmp_path / "c").exists()


def test_inflora_store_from_the_command_line(tmp_path, tiny_model_dir, cli_store):
    a = write_csv(tmp_path / "a.csv", make_task("a"))
    b = write_csv(tmp_path / "b.csv", make_task("b", seed=1))
    store = tmp_path / "inf"
    sharecl_in_process("learn", store, "--task", "a", "--data", a, "--model", tiny_model_dir, "--steps", 4, "-r", 4,
            "--method", "inflora", "--no-progress")
    sharecl_in_process("learn", store, "--task", "b", "--data", b, "--steps", 4, "--no-progress")
    assert read_manifest(store)["method"] == "inflora" and load_store(store).task_names == ["a", "b"]
    out = sharecl_in_process("predict", store, "--task", "b", "--json", "x y z").stdout
    assert json.loads(out.splitlines()[0])["label"] in make_task("b", seed=1).classes
    r = sharecl_in_process("export", store, tmp_path / "exp", "--task", "a", check=False)
    assert r.returncode == 1 and "holds method 'inflora'" in r.stderr
    r = sharecl_in_process("learn", tmp_path / "x", "--task", "a", "--data", a, "--method", "seq-lora", check=False)
    assert r.returncode == 1 and "cannot be stored" in r.stderr and not (tmp_path / "x").exists()


def test_learn_with_align_keeps_aligning_and_a_plain_store_refuses_it(tmp_path, tiny_model_dir, cli_store):
    import torch

    a = write_csv(tmp_path / "a.csv", make_task("a"))
    b = write_csv(tmp_path / "b.csv", make_task("b", seed=1))
    store = tmp_path / "aligned"
    sharecl_in_process("learn", store, "--task", "a", "--data", a, "--model", tiny_model_dir, "--steps", 4, "-r", 4,
            "--align", "--align-rank", "2", "--no-progress")
    m = load_store(store)
    assert m.config.cil_score == "aligned" and set(m.class_stats) == {"a"} and m.kept_align_rank() == 2
    head_a = m.taskid_heads.heads["a"].weight.clone()
    sharecl_in_process("learn", store, "--task", "b", "--data", b, "--steps", 4, "--no-progress")  # no --align: the store keeps aligning
    m = load_store(store)
    assert set(m.class_stats) == {"a", "b"} and m.kept_align_rank() == 2 and m.class_stats["b"][1].shape[-1] == 2
    assert not torch.equal(m.taskid_heads.heads["a"].weight, head_a)  # task a's identification head re-aligned beside b's
    assert store_class_statistics(store) == {"a": "rank 2 + diagonal", "b": "rank 2 + diagonal"}  # read from the files' headers
    assert "classifier alignment: on" in sharecl_in_process("info", store).stdout
    xs = make_task("a").test_inputs[:3] + make_task("b", seed=1).test_inputs[:3]
    rows = [json.loads(line) for line in sharecl_in_process("predict", store, "--json", *xs).stdout.strip().splitlines()]  # no task id
    assert len(rows) == 6 and all(r["label"] in make_task(r["task"], seed="ab".index(r["task"])).classes for r in rows)
    with torch.no_grad():
        want = m.cil_logits(xs).softmax(-1).amax(-1)
    assert [r["probability"] for r in rows] == pytest.approx(want.tolist(), abs=1e-5)
    top1 = [json.loads(line) for line in sharecl_in_process("predict", store, "--json", "--top-tasks", "1", *xs).stdout.strip().splitlines()]
    with torch.no_grad():
        likeliest = m.cil_logits(xs).exp().reshape(len(xs), 2, 3).sum(-1).argmax(-1)  # p(t | x) from the full joint
    assert [r["task"] for r in top1] == ["ab"[int(t)] for t in likeliest]
    assert {r["tasks_scored"] for r in top1} == {1} and "tasks_scored" not in rows[0]
    text_out = sharecl_in_process("predict", store, "--top-tasks", "5", *xs[:1])
    assert "under its 2 likeliest of 2 tasks" in text_out.stderr  # more than the store has: every task ran
    r = sharecl_in_process("predict", store, "--task", "a", "--top-tasks", "1", *xs, check=False)
    assert r.returncode == 1 and "drop --task" in r.stderr
    plain = tmp_path / "plain"
    shutil.copytree(cli_store / "store", plain)
    version = read_manifest(plain)["version"]
    assert store_class_statistics(plain) == {} and "classifier alignment" not in sharecl_in_process("info", plain).stdout
    r = sharecl_in_process("predict", plain, "--top-tasks", "1", "some text", check=False)
    assert r.returncode == 1 and "cil_top_tasks" in r.stderr
    r = sharecl_in_process("learn", plain, "--task", "c", "--data", b, "--align", "--no-progress", check=False)
    assert r.returncode == 1 and "learned without --align" in r.stderr and read_manifest(plain)["version"] == version
    r = sharecl_in_process("learn", plain, "--task", "c", "--data", b, "--align-rank", "2", "--no-progress", check=False)
    assert r.returncode == 1 and "pass --align too" in r.stderr


def test_parse_set_options():
    from sharecl.cli import _parse_set

    assert _parse_set("sd-lora.lr=0.001", ["sd-lora"]) == ("sd-lora", "lr", 0.001)
    assert _parse_set("share.cil_score=energy", ["share"]) == ("share", "cil_score", "energy")
    with pytest.raises(ValueError, match="METHOD.KEY=VALUE"):
        _parse_set("lr=0.1", ["share"])
    with pytest.raises(ValueError, match="not among"):
        _parse_set("inflora.r=4", ["share"])


@pytest.mark.parametrize("args,expect", [
    (["--method", "inflora"], "--method inflora contradicts"),
    (["--k", 5], "--k 5 contradicts"),
    (["--p", 1], "--p 1 contradicts"),
    (["-r", 8], "--rank 8 contradicts"),
    (["--energy", 0.9], "--energy 0.9 contradicts"),
    (["--image-size", 28], "--image-size 28 contradicts"),
    (["--model", "OTHER"], "is not the base model"),
])
def test_learn_refuses_options_that_contradict_the_store(cli_store, tmp_path, tiny_vit_dir, args, expect):
    store = cli_store / "store"
    before = (store / "manifest.json").read_bytes()
    args = [tiny_vit_dir if a == "OTHER" else a for a in args]
    p = sharecl_in_process("learn", store, "--task", "new", "--data", cli_store / "a.csv", "--no-progress", *args, check=False)
    assert p.returncode == 1 and expect in " ".join(p.stderr.split()) and "Traceback" not in p.stderr, p.stderr
    assert "drop" in p.stderr
    assert (store / "manifest.json").read_bytes() == before


def test_learn_accepts_the_store_own_options_and_its_model_at_a_new_place(cli_store, tmp_path, tiny_model_dir):
    store, moved = tmp_path / "store", tmp_path / "moved-model"
    shutil.copytree(cli_store / "store", store)
    shutil.copytree(tiny_model_dir, moved)
    args = learn_b(store, tmp_path)
    args[args.index("--steps") + 1] = 3
    out = sharecl_in_process(*args, "--method", "share", "--k", 4, "--p", 2, "-r", 4, "--model", moved)
    assert "store version 2" in out.stdout
    assert read_manifest(store)["base_model"]["path"] == str(moved)  # the manifest follows the model


def test_a_store_path_that_is_a_file_gets_one_sentence(cli_store, tmp_path):
    f = tmp_path / "afile"
    f.write_text("not a store")
    p = sharecl_in_process("learn", f, "--task", "a", "--data", cli_store / "a.csv", check=False)
    assert p.returncode == 1 and "is a file, not a store directory" in " ".join(p.stderr.split()) and "Errno" not in p.stderr
    assert f.read_text() == "not a store"


@pytest.mark.parametrize("code,expect", [(28, "free some disk space"), (13, "check the permissions")])
def test_disk_full_and_permission_denied_name_the_path_and_the_fix(cli_store, tmp_path, monkeypatch, code, expect):
    import errno as errno_mod

    from typer.testing import CliRunner

    import sharecl.store as store_mod
    from sharecl.cli import app

    assert code in (errno_mod.ENOSPC, errno_mod.EACCES)
    store = tmp_path / "store"
    shutil.copytree(cli_store / "store", store)
    before = (store / "manifest.json").read_bytes()

    def failing_write(path, write):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(store_mod, "atomic_write", failing_write)
    args = learn_b(store, tmp_path)
    args[args.index("--steps") + 1] = 2
    r = CliRunner().invoke(app, [str(a) for a in args])
    out = " ".join(r.output.split())
    assert r.exit_code == 1 and expect in out and str(store) in out and "previous version" in out, r.output
    assert (store / "manifest.json").read_bytes() == before
    assert load_store(store).task_names == ["a"]
