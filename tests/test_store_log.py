"""Share stores that append: a checkpoint plus one log file per version (issue 15 §4).

What is checked: the coefficients a log replays equal the merges' own re-projection to float32
round-off (an independent computation: the merge's per-task products vs the log's composed
changes of basis); appended versions reload bit-exactly; the bytes of an append do not grow
with the number of tasks; the log is folded into a checkpoint before it outgrows it; a store in
the old single-file format still loads."""

import contextlib
from unittest import mock

import pytest
import torch
from torch import nn

from conftest import make_task
from sharecl.adapters.share import ShareLinear
from sharecl.coeff_log import CoefficientLog
from sharecl.store import load_store, read_manifest, save_store, store_tasks
from sharecl.subspace import merge_subspace


def test_log_replay_equals_the_merges_own_reprojection():
    """30 truncating merges (k = 6, p = 2): the layer's materialised coefficients (checkpoint +
    log, changes of basis composed backwards) against the coefficients each merge computed for
    every old task directly, carried forward in float64."""
    g = torch.Generator().manual_seed(0)
    layer = ShareLinear(nn.Linear(24, 20), scaling=1.0, p=2)
    fast = ShareLinear(nn.Linear(24, 20), scaling=1.0, p=2)  # kept Grams, no re-projection
    lazy = ShareLinear(nn.Linear(24, 20), scaling=1.0, p=2)  # as ShareMethod merges: the same, reading the logs
    eager_B = eager_A = None
    for t in range(30):
        B, A = torch.randn(20, 3, generator=g), torch.randn(3, 24, generator=g)
        res = merge_subspace(layer.U if t else None, layer.V if t else None, eager_B, eager_A, B, A, p=2, k=6)
        eager_B, eager_A = res.coeff_B, res.coeff_A  # float64, every task re-projected by the merge itself
        layer.apply_merge(res)
        quick = merge_subspace(fast.U if t else None, fast.V if t else None, fast.coeff_B if t else None,
                               fast.coeff_A if t else None, B, A, p=2, k=6, grams=fast.merge_grams() if t else None,
                               reproject=False)
        fast.apply_merge(quick)
        # with many tasks (the Gram path) the merge reads old tasks only through the log: never materialises them
        with mock.patch.object(CoefficientLog, "materialize", side_effect=AssertionError("materialised")) if t >= 10 \
                else contextlib.nullcontext():
            logged = merge_subspace(lazy.U if t else None, lazy.V if t else None, lazy.log_B if t else None,
                                    lazy.log_A if t else None, B, A, p=2, k=6, grams=lazy.merge_grams() if t else None,
                                    reproject=False)
            lazy.apply_merge(logged)
        assert torch.allclose(logged.drift, res.drift, atol=1e-5) and torch.allclose(logged.U @ logged.U.T, res.U @ res.U.T, atol=1e-5)
        assert quick.coeff_B.shape[0] == 1 and torch.allclose(quick.drift, res.drift, atol=1e-5), t
        assert torch.allclose(quick.U @ quick.U.T, res.U @ res.U.T, atol=1e-5)
        if t == 17:
            layer.log_B.compact(), layer.log_A.compact()  # a checkpoint midway
    assert res.drift[:-1].max() > 1e-3  # the merges truncate: old tasks really move
    assert len(layer.log_B.steps) == 12 and layer.log_B.base.shape[0] == 18
    assert lazy.num_tasks == 30 and lazy._stale
    for got, want in ((layer.coeff_B, eager_B), (layer.coeff_A, eager_A), (fast.coeff_B, eager_B), (fast.coeff_A, eager_A),
                      (lazy.coeff_B, eager_B), (lazy.coeff_A, eager_A)):
        err = (got.double() - want).norm(dim=(1, 2)) / want.norm(dim=(1, 2))
        assert err.max() < 1e-4, err.max()  # float32 round-off (and the sign of each basis column)


def test_left_multiply_follows_appends_set_last_and_compaction():
    """What a merge reads of old tasks, ``M @ C_i``, against ``M`` times the log's materialised
    coefficients (a backward pass over the whole log) after every kind of change to the log: merges
    appended one by one (the kept state brought up to date), a growing basis, the newest task
    replaced (merge fine-tuning), and a fold into a new checkpoint."""
    g = torch.Generator().manual_seed(3)
    log = CoefficientLog(torch.randn(4, 3, 2, generator=g, dtype=torch.float64))

    def merge(k_new):
        k = log.steps[-1][0].shape[0] if log.steps else log.base.shape[1]
        log.append(torch.linalg.qr(torch.randn(k_new, k, generator=g, dtype=torch.float64))[0] if k_new >= k
                   else torch.linalg.qr(torch.randn(k, k_new, generator=g, dtype=torch.float64))[0].T,
                   torch.randn(k_new, 2, generator=g, dtype=torch.float64))

    def check():
        k = log.steps[-1][0].shape[0] if log.steps else log.base.shape[1]
        M = torch.randn(2, k, generator=g, dtype=torch.float64)
        got, want = log.left_multiply(M), M @ log.materialize(torch.float64)
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-12), (got - want).abs().max()

    check()
    for k_new in (5, 5, 6, 6):  # the basis grows, then settles
        merge(k_new)
        check()
    merge(6), merge(4)  # two merges between reads, the second shrinking the basis
    check()
    log.set_last(torch.randn(4, 2, generator=g, dtype=torch.float64))
    check()
    log.compact()
    check()
    merge(4), merge(5)
    check()


@torch.no_grad()
def _out(method, xs, task):
    """What a task computes: its logits, or its pooled features for an adapter-only task."""
    if task in method.heads:
        return method.logits(xs, task)
    with method.task(task):
        return method._features(xs)


def _random_adapter(method, seed, r=3):
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(layer.out_features, r, generator=g) * 0.1, torch.randn(r, layer.in_features, generator=g) * 0.1)
            for n, layer in method.layers.items()}


def test_appended_versions_reload_exactly_and_leave_the_checkpoint_alone(tiny_share, fast_cfg, tmp_path):
    store, xs, seen = tmp_path / "s", make_task("a").test_inputs, []
    tiny_share.learn(make_task("a"), fast_cfg, progress=False)
    first = save_store(tiny_share, store)["files"]["state"]
    writer = tiny_share
    for i, name in enumerate("bcde"):
        if i % 2:
            writer.learn(make_task(name, seed=i + 1), fast_cfg, progress=False)
        else:
            writer.add_adapter(name, _random_adapter(writer, i), scaling=1.0)
        m = save_store(writer, store, compact=False)
        assert m["files"]["state"] == first and len(m["files"]["log"]) == i + 1  # one more file, nothing rewritten
        reader = load_store(store)
        assert reader.task_names == ["a", *"bcde"[: i + 1]] == [t["name"] for t in store_tasks(store)]
        for t in reader.task_names:
            assert torch.equal(_out(reader, xs, t), _out(writer, xs, t)), (i, t)
        seen.append({t: _out(reader, xs, t) for t in reader.task_names})
        writer = reader if i == 1 else writer  # go on from a reloaded method too
    m = save_store(writer, store, compact=True)  # folding the log changes no prediction
    assert m["files"]["log"] == [] and sorted(f.name for f in store.iterdir()) == [".lock", "manifest.json", m["files"]["state"]["name"]]
    folded = load_store(store)
    for t, want in seen[-1].items():
        assert torch.equal(_out(folded, xs, t), want)


def test_an_append_writes_the_same_bytes_with_5_or_60_tasks(tiny_share, tmp_path):
    """Bytes of the n-th append: bases, k² changes of basis per layer and side, the new task, and
    8 bytes per old task (its drift in the last merge); nothing else grows with n."""
    store = tmp_path / "s"
    sizes, manifest = {}, {}
    for n in range(1, 61):
        tiny_share.add_adapter(f"t{n}", _random_adapter(tiny_share, n), scaling=1.0)
        m = save_store(tiny_share, store, compact=False)
        if n in (5, 60) and m["files"]["log"]:
            sizes[n] = m["files"]["log"][-1]["bytes"]
            manifest[n] = (store / "manifest.json").read_text()
    assert set(sizes) == {5, 60}, sizes
    assert sizes[60] - sizes[5] <= 8 * 55 + 64, sizes  # the drift of 55 more old tasks, float32 × 2
    # the manifest names its files (one line per log file since the checkpoint), never the tasks
    assert '"t5"' not in manifest[60] and len(manifest[60]) - len(manifest[5]) < 250 * 55
    assert len(store_tasks(store)) == 60


def test_the_log_is_folded_before_it_outgrows_the_checkpoint(tiny_share, tmp_path):
    store, appended, folded = tmp_path / "s", 0, 0
    for n in range(1, 41):
        tiny_share.add_adapter(f"t{n}", _random_adapter(tiny_share, n), scaling=1.0)
        m = save_store(tiny_share, store)
        log = sum(e["bytes"] for e in m["files"]["log"])
        assert log < m["files"]["state"]["bytes"]
        appended += bool(m["files"]["log"])
        folded += not m["files"]["log"]
    assert appended > 10 and folded > 1
    reader = load_store(store)
    xs = make_task("a").test_inputs
    for t in reader.task_names:
        assert torch.equal(_out(reader, xs, t), _out(tiny_share, xs, t))


def test_a_format_1_store_loads_and_its_next_write_is_format_2(tiny_share, fast_cfg, tmp_path):
    """A store as sharecl wrote it before logs (one state file; tasks, merges and method state in
    the manifest) is built from a checkpoint here, loaded, taught one more task and saved."""
    from conftest import to_format1

    store = tmp_path / "s"
    for i, name in enumerate("ab"):
        tiny_share.learn(make_task(name, seed=i), fast_cfg, progress=False)
    save_store(tiny_share, store, compact=True)
    to_format1(store)
    assert read_manifest(store)["format_version"] == 1 and [t["name"] for t in store_tasks(store)] == ["a", "b"]
    loaded = load_store(store)
    xs = make_task("a").test_inputs
    for t in "ab":
        assert torch.equal(loaded.logits(xs, t), tiny_share.logits(xs, t))
    loaded.learn(make_task("c", seed=2), fast_cfg, progress=False)
    new = save_store(loaded, store)
    assert new["format_version"] == 2 and new["files"]["log"] == [] and not (store / "state-v1.safetensors").exists()
    assert [t["name"] for t in store_tasks(store)] == ["a", "b", "c"]
    assert torch.equal(load_store(store).logits(xs, "c"), loaded.logits(xs, "c"))


@pytest.mark.parametrize("damage", ["missing", "flipped"])
def test_a_damaged_log_file_is_refused(tiny_share, fast_cfg, tmp_path, damage):
    store = tmp_path / "s"
    tiny_share.learn(make_task("a"), fast_cfg, progress=False)
    save_store(tiny_share, store)
    tiny_share.add_adapter("b", _random_adapter(tiny_share, 1), scaling=1.0)
    f = store / save_store(tiny_share, store, compact=False)["files"]["log"][0]["name"]
    if damage == "missing":
        f.unlink()
    else:
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 1
        f.write_bytes(bytes(data))
    from sharecl.store import StoreError

    with pytest.raises(StoreError, match="missing|sha256"):
        load_store(store)
    assert read_manifest(store)["version"] == 2


def test_changing_an_old_task_makes_the_next_write_a_checkpoint(tiny_share, fast_cfg, tmp_path):
    """An old task's coefficients changed in place (as Share-full's fine-tuning of old tasks
    would) cannot be expressed as an appended merge: the store gets a checkpoint, and the
    reload has the change."""
    store, xs = tmp_path / "s", make_task("a").test_inputs
    tiny_share.learn(make_task("a"), fast_cfg, progress=False)
    save_store(tiny_share, store)
    tiny_share.add_adapter("b", _random_adapter(tiny_share, 1), scaling=1.0)
    assert save_store(tiny_share, store, compact=False)["files"]["log"]
    tiny_share.add_adapter("c", _random_adapter(tiny_share, 2), scaling=1.0)
    for layer in tiny_share.layers.values():
        layer.set_coefficients(0, layer.coeff_B[0] * 1.5, layer.coeff_A[0])
    m = save_store(tiny_share, store, compact=False)
    assert m["files"]["log"] == []
    reader = load_store(store)
    for t in "abc":
        assert torch.equal(_out(reader, xs, t), _out(tiny_share, xs, t))


def test_long_streams_keep_per_task_drift_for_the_last_merge_only(tiny_share, monkeypatch):
    """Merge records grow as T²/2 per-task entries; past the cap, older merges keep their summary
    (the worst drift survives) and the newest keeps every task's drift."""
    import sharecl.methods.share as share_module

    monkeypatch.setattr(share_module, "DRIFT_ENTRIES_MAX", 20)
    for i in range(9):
        tiny_share.add_adapter(f"a{i}", _random_adapter(tiny_share, i), scaling=1.0)
    records = tiny_share.drift
    assert len(records) == 9 and set(records[-1]["per_task"]) == {f"a{i}" for i in range(8)}
    held = sum(len(r.get("per_task") or {}) for r in records)
    assert 8 <= held <= 20 + 8, held
    summarised = [r for r in records if "per_task" not in r]
    assert summarised and all("drift_max" in r for r in summarised[1:])  # the first merge had no old task

