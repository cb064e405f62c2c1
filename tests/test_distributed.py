"""Data parallelism under torchrun with the gloo backend, devices and precision (CPU only).

The two-process tests launch the real ``torchrun`` on the tiny model: the same tasks learned
by 2 processes with the same global batch must give what 1 process gives.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import learn_b, make_task, sharecl
from sharecl.store import load_store, read_manifest

WORKER = Path(__file__).with_name("dist_worker.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "SHARECL_DIST_TIMEOUT": "60"}


def _run_worker(method: str, model: str, out: Path, nproc: int) -> None:
    cmd = ([sys.executable] if nproc == 1 else TORCHRUN + [f"--nproc_per_node={nproc}"]) + [str(WORKER), method, model, str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert p.returncode == 0, f"{cmd} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"


def _products(state: dict, method: str) -> dict[str, torch.Tensor]:
    """The tensors that carry meaning whatever sign an SVD gave a singular vector: each task's
    ``ΔW`` per layer (Share: ``U C_B[t] C_A[t]ᵀ Vᵀ``; InfLoRA: ``B_t A_t``), InfLoRA's memory
    projector ``M Mᵀ``, and the heads. SD-LoRA has no SVD: all its tensors as they are."""
    if method not in ("share", "inflora"):
        return dict(state)
    out = {k: v for k, v in state.items() if k.startswith("heads.")}
    for key, v in state.items():
        if method == "share" and key.endswith(".U"):
            layer = key[: -len(".U")]
            U, V, cB, cA = (state[f"{layer}.{s}"].double() for s in ("U", "V", "coeff_B", "coeff_A"))
            for t in range(cB.shape[0]):
                out[f"{layer}.dW.{t}"] = U @ cB[t] @ cA[t].T @ V.T
        if method == "inflora" and ".B." in key:  # A_t is stored once per input: query's serves value
            a = key.replace(".B.", ".A.")
            if a not in state:
                layer, t = key.split(".B.")
                a = next(k for k in state if k.startswith(layer.rsplit(".", 1)[0] + ".") and k.endswith(f".A.{t}"))
            out[key.replace(".B.", ".BA.")] = v.double() @ state[a].double()
        if key.startswith("memory."):
            out[key + ".projector"] = v.double() @ v.double().T
    return out


def _sign_aligned(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``diag(±1)`` that best aligns the columns of basis ``b`` with those of ``a``."""
    return torch.diag(torch.sign((a * b).sum(0)))


@pytest.mark.multiprocess
@pytest.mark.parametrize("method", ["share", "inflora", "sd-lora-kd", "share-lm"])
def test_two_processes_learn_what_one_process_learns(method, tiny_model_dir, tmp_path):
    """Two gloo processes sharing each global batch learn what one process learns; ``share-lm``
    trains generation tasks, whose loss each rank weights by its share of the batch's target tokens."""
    _run_worker(method, tiny_model_dir, tmp_path / "one", 1)
    _run_worker(method, tiny_model_dir, tmp_path / "two", 2)
    one = load_file(tmp_path / "one" / "rank-0.safetensors")
    r0, r1 = (load_file(tmp_path / "two" / f"rank-{r}.safetensors") for r in (0, 1))
    # every rank holds exactly the same state (the between-task work saw the same reduced statistics)
    assert r0.keys() == r1.keys() == one.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    # and it is what one process learns with the same global batch, within float32 tolerance
    method = method.removesuffix("-lm")
    p1, p2 = _products(one, method), _products(r0, method)
    assert p1.keys() == p2.keys() and any(".dW." in k or ".BA." in k or "_old" in k for k in p1)
    for k in p1:
        err = (p1[k].double() - p2[k].double()).norm() / p1[k].double().norm().clamp_min(1e-12)
        assert err < 1e-4, f"{k}: relative difference {err:.2e}"
    if method == "share":  # the coefficients themselves agree once each basis column's sign is aligned
        for key in [k for k in one if k.endswith(".U")]:
            layer = key[: -len(".U")]
            dU = _sign_aligned(one[f"{layer}.U"], r0[f"{layer}.U"])
            dV = _sign_aligned(one[f"{layer}.V"], r0[f"{layer}.V"])
            torch.testing.assert_close(r0[f"{layer}.U"], one[f"{layer}.U"] @ dU, atol=1e-4, rtol=0)
            torch.testing.assert_close(r0[f"{layer}.coeff_B"], dU @ one[f"{layer}.coeff_B"], atol=1e-4, rtol=0)
            torch.testing.assert_close(r0[f"{layer}.coeff_A"], dV @ one[f"{layer}.coeff_A"], atol=1e-4, rtol=0)
    rec = [json.loads((tmp_path / d / "rank-0.json").read_text()) for d in ("one", "two")]
    assert rec[0]["world_size"] == 1 and rec[1]["world_size"] == 2
    assert rec[0]["accuracy"] == rec[1]["accuracy"]
    assert rec[0]["losses"] == pytest.approx(rec[1]["losses"], rel=1e-5)


def _torchrun_learn(store, data_dir, model, steps):
    args = [str(a) for a in learn_b(store, data_dir)]
    args[args.index("--steps") + 1] = str(steps)
    return TORCHRUN + ["--nproc_per_node=2", "-m", "sharecl", *args, "--device", "cpu"]


@pytest.mark.multiprocess
def test_torchrun_learn_writes_the_store_once(cli_store, tiny_model_dir, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(cli_store / "store", store)
    p = subprocess.run(_torchrun_learn(store, tmp_path, tiny_model_dir, 6), capture_output=True, text=True, env=_env(), timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("learned b") == 1  # rank 0 alone reports
    assert read_manifest(store)["version"] == 2
    assert load_store(store).task_names == ["a", "b"]
    assert not [f.name for f in store.iterdir() if f.name.startswith(".state") or ".tmp" in f.name]


def _rank_process(root: psutil.Process, rank: int) -> psutil.Process | None:
    for child in root.children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


@pytest.mark.multiprocess
def test_a_killed_rank_fails_the_run_and_leaves_the_store_at_its_previous_version(cli_store, tiny_model_dir, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(cli_store / "store", store)
    before = read_manifest(store)
    proc = subprocess.Popen(_torchrun_learn(store, tmp_path, tiny_model_dir, 100_000), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env())
    try:
        root = psutil.Process(proc.pid)
        victim, deadline = None, time.time() + 120
        while victim is None and time.time() < deadline:
            victim = _rank_process(root, 1)
            time.sleep(0.2)
        assert victim is not None, "rank 1 never started"
        time.sleep(8.0)  # past loading: the ranks are training in lockstep
        assert proc.poll() is None
        victim.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "SIGKILL" in out and "rank      : 1" in out, out[-2000:]  # torchrun names the lost rank
    after = read_manifest(store)
    assert after["version"] == before["version"] and after["files"] == before["files"]
    assert load_store(store).task_names == ["a"]
    # a later single-process run is not hindered (no lock or debris left behind)
    sharecl(*learn_b(store, tmp_path))
    assert read_manifest(store)["version"] == before["version"] + 1


def test_device_and_precision_errors():
    from sharecl.backbone import load_encoder
    from sharecl.distributed import autocast, resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="--device must be"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="--precision"):
        autocast(torch.device("cpu"), "fp8")
    with pytest.raises(ValueError, match="--precision"):
        load_encoder(precision="fp16")


def test_bf16_learns_with_float32_weights(tiny_model_dir, fast_cfg):
    """bf16 autocast runs the backbone's matmuls in bfloat16; what is trained and stored stays float32."""
    from dataclasses import replace

    from sharecl.backbone import load_encoder
    from sharecl.methods.share import ShareMethod
    from sharecl.train import evaluate

    m = ShareMethod(load_encoder(tiny_model_dir, max_length=16, precision="bf16"), seed=0, r=4, lora_alpha=8, p=2, k=4, phi=2)
    t = make_task("a")
    info = m.learn(t, replace(fast_cfg, steps=30), progress=False)
    assert torch.isfinite(torch.tensor(info["final_loss"]))
    assert all(v.dtype == torch.float32 for v in m.state_tensors().values())
    z = m._features(t.test_inputs[:4])
    assert z.dtype == torch.float32
    assert evaluate(lambda xs: m.logits(xs, "a"), t, 16) > 1 / 3  # better than chance


def test_a_global_batch_smaller_than_the_world_is_refused(monkeypatch, tiny_share, fast_cfg):
    from dataclasses import replace

    from sharecl import distributed as dist

    monkeypatch.setattr(dist, "world_size", lambda: 16)
    with pytest.raises(ValueError, match="cannot be shared by 16 processes"):
        tiny_share.learn(make_task("a"), replace(fast_cfg, batch_size=8), progress=False)


@pytest.mark.multiprocess
def test_torchrun_compare_matches_one_process(tiny_model_dir, tmp_path):
    """`sharecl compare` unchanged under torchrun: rank 0 alone reports and writes, and the
    accuracy matrices equal a one-process run's (Share, DualLoRA's covariance pass, joint LoRA)."""
    args = ["compare", "--stream", "text5", "--methods", "share,dual-lora,joint-lora", "--seeds", "0", "--steps", "2",
            "--model", tiny_model_dir, "--no-progress", "--device", "cpu"]
    two = subprocess.run(TORCHRUN + ["--nproc_per_node=2", "-m", "sharecl", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert two.stdout.count("# sharecl compare") == 1 and two.stdout.count("share · after bbc-topic") == 1
    sharecl(*args, "--out", tmp_path / "one")
    for m in ("share", "dual-lora", "joint-lora"):
        r1, r2 = (json.loads((tmp_path / d / "seed-0" / m / "results.json").read_text()) for d in ("one", "two"))
        assert (r1["world_size"], r2["world_size"]) == (1, 2)
        # the training itself agrees to float32 round-off (the all-reduced losses of every task) ...
        l1, l2 = ([t["final_loss"] for t in r["task_info"]] for r in (r1, r2))
        assert l1 == pytest.approx(l2, rel=1e-4), m
        # ... and accuracies to one test example per task: on a tiny random model some test inputs sit on
        # a decision boundary, and the order of float sums (2 shards vs 1, AVX-512 vs portable kernels)
        # can flip one (measured: 1 of 180 under MKL_CBWR=COMPATIBLE ATEN_CPU_CAPABILITY=default)
        for row1, row2 in zip(r1["accuracy_matrix"], r2["accuracy_matrix"]):
            for a1, a2 in zip(row1, row2):
                assert (a1 is None) == (a2 is None) and (a1 is None or abs(a1 - a2) <= 1 / 150 + 1e-9), m  # text5: ≥ 150 test inputs a task
    assert (tmp_path / "two" / "seed-0" / "share" / "store" / "manifest.json").exists()


@pytest.mark.multiprocess
def test_multi_node_torchrun_arguments(tiny_model_dir, tmp_path):
    """Two "nodes" on this machine, launched as on two machines (--nnodes 2 --node_rank i
    --master_addr/--master_port): the same state on both, equal to one process's."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "nodes"
    cmds = [[sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={i}", "--nproc_per_node=1",
             "--master_addr=127.0.0.1", f"--master_port={port}", str(WORKER), "share", tiny_model_dir, str(out)] for i in (0, 1)]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env()) for c in cmds]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(x[-2000:] for x in logs)
    r0, r1 = (load_file(out / f"rank-{r}.safetensors") for r in (0, 1))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    _run_worker("share", tiny_model_dir, tmp_path / "one", 1)
    p1, p2 = _products(load_file(tmp_path / "one" / "rank-0.safetensors"), "share"), _products(r0, "share")
    for k in p1:
        assert (p1[k].double() - p2[k].double()).norm() / p1[k].double().norm().clamp_min(1e-12) < 1e-4, k
