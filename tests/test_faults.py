"""Faults on the store: `learn` killed during training, the merge and the write; two writers;
a tensor file swapped for another store's."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import learn_b, sharecl
from sharecl.store import StoreError, load_store, read_manifest

pytestmark = pytest.mark.multiprocess  # every test here starts `sharecl` in a fresh interpreter

# `sharecl learn`, unchanged, with two markers on stdout and a slower fsync, so that kills can be
# aimed at the merge (ShareMethod.end_task) and at every step of the atomic write.
CHILD = r"""
import os, sys, time
import sharecl.store as store
from sharecl.methods.share import ShareMethod

end_task = ShareMethod.end_task

def marked_end_task(self, *args, **kwargs):
    print("MERGE", flush=True)
    return end_task(self, *args, **kwargs)
ShareMethod.end_task = marked_end_task

save_store = store.save_store
def marked_save_store(*args, **kwargs):
    print("WRITE", flush=True)
    return save_store(*args, **kwargs)
store.save_store = marked_save_store

fsync = os.fsync
def slow_fsync(fd):
    time.sleep(0.15)
    fsync(fd)
os.fsync = slow_fsync

from sharecl.cli import app
app(sys.argv[1:])
"""


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}


def _kill_at(store, data_dir, marker: str | None, delay: float) -> None:
    """SIGKILL the marked `sharecl learn` ``delay`` seconds after it prints ``marker`` (None: after start).

    Raises:
        AssertionError: the child ended without printing ``marker`` (it crashed: the kill would test nothing).
    """
    err = open(data_dir / "child-stderr.txt", "w+")  # a file, not a pipe: a full pipe would stall the child
    proc = subprocess.Popen([sys.executable, "-u", "-c", CHILD, *map(str, learn_b(store, data_dir))],
                            stdout=subprocess.PIPE, stderr=err, text=True, env=_env())
    try:
        if marker is not None:
            seen = False
            for line in proc.stdout:
                if line.strip() == marker:
                    seen = True
                    break
            if not seen:
                proc.wait()
                err.seek(0)
                raise AssertionError(f"the child exited ({proc.returncode}) before printing {marker}: {err.read()[-2000:]}")
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        err.close()


def test_learn_killed_during_training_merge_and_write_leaves_the_previous_or_the_new_version(cli_store, tmp_path):
    rng = random.Random(1)
    store = tmp_path / "store"
    plan = [(None, rng.uniform(0.5, 4.0)) for _ in range(3)] + [("MERGE", rng.uniform(0.0, 0.3)) for _ in range(3)] \
        + [("WRITE", rng.uniform(0.0, 0.9)) for _ in range(6)]
    outcomes = []
    for marker, delay in plan:
        if store.exists():
            shutil.rmtree(store)
        shutil.copytree(cli_store / "store", store)
        _kill_at(store, tmp_path, marker, delay)
        m = load_store(store)  # never anything but a loadable version
        version = read_manifest(store)["version"]
        assert (version, m.task_names) in [(1, ["a"]), (2, ["a", "b"])], (marker, delay)
        outcomes.append((marker, round(delay, 2), version))
    versions = {v for _, _, v in outcomes}
    assert 1 in versions, outcomes  # kills before the manifest's rename keep version 1
    # whatever debris the last kill left, the next writer goes through
    if read_manifest(store)["version"] == 2:
        shutil.rmtree(store)
        shutil.copytree(cli_store / "store", store)
        _kill_at(store, tmp_path, "WRITE", 0.2)
    sharecl(*learn_b(store, tmp_path)) if read_manifest(store)["version"] == 1 else None
    assert load_store(store).task_names == ["a", "b"]
    assert not [f.name for f in store.iterdir() if f.name.startswith(".state") or ".tmp" in f.name]


def _flock_held(path) -> bool:
    """Whether some process holds a flock on ``path`` (Linux ``/proc/locks``; reading takes no lock)."""
    inode = os.stat(path).st_ino
    with open("/proc/locks") as fh:
        return any(line.split()[1] == "FLOCK" and line.split()[5].endswith(f":{inode}") for line in fh)


def test_a_second_writer_is_refused_and_nothing_is_lost(cli_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(cli_store / "store", store)
    args = learn_b(store, tmp_path)
    args[args.index("--steps") + 1] = 400  # long enough to overlap
    first = subprocess.Popen([sys.executable, "-m", "sharecl", *map(str, args)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.time() + 120
        while not _flock_held(store / ".lock"):  # wait until `first` holds the store's lock (without touching it)
            assert time.time() < deadline and first.poll() is None, "the first writer never took the lock"
            time.sleep(0.05)
        c = learn_b(store, tmp_path)
        c[c.index("--task") + 1] = "c"
        second = sharecl(*c, check=False)
        assert second.returncode == 1 and "being written by another process" in second.stderr, second.stderr
        assert first.wait(timeout=300) == 0
    finally:
        if first.poll() is None:
            first.kill()
    assert load_store(store).task_names == ["a", "b"]
    c = learn_b(store, tmp_path)
    c[c.index("--task") + 1] = "c"
    sharecl(*c)  # after the first writer: both tasks are there
    assert load_store(store).task_names == ["a", "b", "c"]


def test_a_state_file_swapped_for_another_stores_is_refused(cli_store, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(cli_store / "store", a)
    shutil.copytree(cli_store / "store", b)
    sharecl(*learn_b(b, tmp_path))  # b moves to version 2 with other tensors (a new checkpoint or a log file)
    name_a = read_manifest(a)["files"]["state"]["name"]
    files_b = read_manifest(b)["files"]
    newest_b = (files_b["log"][-1] if files_b["log"] else files_b["state"])["name"]
    shutil.copy(b / newest_b, a / name_a)  # a's name, another store's tensors
    with pytest.raises(StoreError, match="does not match its sha256"):
        load_store(a)
