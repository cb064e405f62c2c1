"""`sharecl compare`: seeds × methods, aggregation, resume, report files; the wordnet-cil stream."""

import json

import pytest

from conftest import make_task
from sharecl.compare import aggregate, compare
from sharecl.data import streams
from sharecl.data.tasks import Stream


@pytest.fixture
def tiny_stream(monkeypatch):
    def build(seed=0):
        return Stream("tiny-cil", [make_task("a", seed), make_task("b", seed + 1)], seed, "cil")

    monkeypatch.setitem(streams.STREAMS, "tiny-cil", build)
    return "tiny-cil"


def test_compare_two_seeds_writes_reports_and_resumes(tiny_stream, tiny_model_dir, fast_cfg, tmp_path):
    calls = []
    log = calls.append
    methods = ["share", "inflora", "lora-per-task"]
    cfgs = {"share": {"r": 4, "k": 4, "p": 2}, "inflora": {"r": 4}}
    summary, md = compare(tiny_stream, methods, [0, 1], fast_cfg, tmp_path, model_path=tiny_model_dir,
                          method_configs=cfgs, progress=False, log=log)
    assert set(summary) == {"share", "inflora"}  # lora-per-task needs a task id
    assert "lora-per-task" in md and "needs" not in md
    for m in ("share", "inflora"):
        finals = [json.loads((tmp_path / f"seed-{s}" / m / "results.json").read_text())["final_average_accuracy"] for s in (0, 1)]
        assert summary[m]["final_average_accuracy"]["mean"] == pytest.approx(sum(finals) / 2)
        assert summary[m]["seeds"] == [0, 1] and len(summary[m]["curve"]) == 2
    data = json.loads((tmp_path / "compare.json").read_text())
    assert data["scenario"] == "cil" and "lora-per-task" in data["skipped"]
    assert (tmp_path / "accuracy_curve.png").stat().st_size > 1000 and (tmp_path / "bytes.png").stat().st_size > 1000
    assert "| share |" in (tmp_path / "compare.md").read_text()
    calls.clear()
    again, _ = compare(tiny_stream, ["share"], [0, 1], fast_cfg, tmp_path, model_path=tiny_model_dir,
                       method_configs=cfgs, progress=False, log=log)
    assert sum("reusing" in c for c in calls) == 2
    assert again["share"]["final_average_accuracy"] == summary["share"]["final_average_accuracy"]
    compare(tiny_stream, ["head-only"], [0], fast_cfg, tmp_path, model_path=tiny_model_dir, progress=False, log=log)
    listed = json.loads((tmp_path / "seed-0" / "manifest.json").read_text())["methods"]
    assert listed == ["share", "inflora", "head-only"]  # a method added later joins the seed's manifest
    from dataclasses import replace

    with pytest.raises(ValueError, match=r"other settings: steps=6 \(now 7\)"):  # never mix budgets in one table
        compare(tiny_stream, ["share"], [0], replace(fast_cfg, steps=7), tmp_path, model_path=tiny_model_dir,
                method_configs=cfgs, progress=False, log=log)
    with pytest.raises(ValueError, match=r"share.k=4 \(now 5\)"):
        compare(tiny_stream, ["share"], [0], fast_cfg, tmp_path, model_path=tiny_model_dir,
                method_configs={"share": {"r": 4, "k": 5, "p": 2}}, progress=False, log=log)


def test_compare_with_alignment_runs_share_and_resumes(tiny_stream, tiny_model_dir, fast_cfg, tmp_path):
    from dataclasses import replace

    calls = []
    cfg = replace(fast_cfg, align=True, align_steps=3, align_samples=4)
    cfgs = {"share": {"r": 4, "k": 4, "p": 2}}
    first, _ = compare(tiny_stream, ["share", "head-only"], [0], cfg, tmp_path, model_path=tiny_model_dir,
                       method_configs=cfgs, progress=False, log=calls.append)
    assert set(first) == {"share", "head-only"}  # Share aligns (its base-feature task identification)
    res = json.loads((tmp_path / "seed-0" / "share" / "results.json").read_text())
    assert res["config"]["cil_score"] == "aligned" and res["train_config"]["align"]
    again, _ = compare(tiny_stream, ["share"], [0], cfg, tmp_path, model_path=tiny_model_dir,
                       method_configs=cfgs, progress=False, log=calls.append)
    assert any("reusing" in c for c in calls) and again["share"] == first["share"]


def test_compare_rejects_unknown_methods_and_empty_lists(tiny_stream, fast_cfg, tmp_path):
    with pytest.raises(KeyError, match="unknown method"):
        compare(tiny_stream, ["shar"], [0], fast_cfg, tmp_path)
    with pytest.raises(ValueError, match="at least one"):
        compare(tiny_stream, ["share"], [], fast_cfg, tmp_path)


def test_aggregate_mean_and_sample_std():
    def res(seed, acc):
        return {"train_config": {"seed": seed}, "scenario": "til", "tasks": ["a"], "accuracy_matrix": [[acc]],
                "final_average_accuracy": acc}

    out = aggregate({"m": [res(0, 0.5), res(1, 0.7)]})["m"]
    assert out["final_average_accuracy"]["mean"] == pytest.approx(0.6)
    assert out["final_average_accuracy"]["std"] == pytest.approx(0.1414213, rel=1e-5)
    assert out["forgetting"] == {"mean": None, "std": None} and out["curve"] == [pytest.approx(0.6)]


@pytest.mark.slow
def test_wordnet_cil_stream_shape_and_seeded_order():
    s0, s1 = streams.get_stream("wordnet-cil", seed=0), streams.get_stream("wordnet-cil", seed=1)
    assert s0.scenario == "cil" and len(s0) == 5
    classes = [c for t in s0 for c in t.classes]
    assert len(classes) == len(set(classes)) == 20
    assert "noun.Tops" not in classes and "noun.motive" not in classes
    assert classes != [c for t in s1 for c in t.classes] and sorted(classes) == sorted(c for t in s1 for c in t.classes)
    for t in s0:
        assert t.num_classes == 4 and len(t.train_inputs) == 4 * 48 and len(t.test_inputs) == 4 * 30
        assert not set(t.train_inputs) & set(t.test_inputs)
    everything = [x for t in s0 for x in t.train_inputs + t.test_inputs]
    assert len(everything) == len(set(everything))  # no input under two classes or two tasks


def test_tune_lr_chooses_on_the_validation_split_and_runs_every_seed_with_the_choice(tiny_model_dir, fast_cfg, tmp_path,
                                                                                     monkeypatch):
    from conftest import make_task
    from sharecl.data.tasks import split_task

    def task(name, seed):  # make_task's data, with 4 validation examples per class carved from training
        t = make_task(name, seed, n_per_class=16)
        data = {}
        for x, y in zip(t.train_inputs + t.test_inputs, t.train_labels + t.test_labels):
            data.setdefault(t.classes[y], []).append(x)
        return split_task(name, data, seed=seed, train_per_class=None, test_per_class=4, val_per_class=4)

    monkeypatch.setitem(streams.STREAMS, "tiny-val", lambda seed=0: Stream("tiny-val", [task("a", seed), task("b", seed + 1)],
                                                                           seed, "til"))
    monkeypatch.setitem(streams.STREAMS, "tiny-noval", lambda seed=0: Stream("tiny-noval", [make_task("a", seed)], seed, "til"))
    summary, md = compare("tiny-val", ["head-only", "zero-shot"], [0, 1], fast_cfg, tmp_path, model_path=tiny_model_dir,
                          progress=False, log=lambda *_: None, tune_lrs=[1e-2, 1e-5])
    tuned = json.loads((tmp_path / "compare.json").read_text())["tuned_lr"]
    assert list(tuned) == ["head-only"]  # zero-shot trains nothing
    scores = tuned["head-only"]["validation_final_accuracy"]
    assert set(scores) == {"0.01", "1e-05"} and tuned["head-only"]["lr"] == max([1e-2, 1e-5], key=lambda lr: scores[f"{lr:g}"])
    val_run = json.loads((tmp_path / "tune" / "lr-0.01" / "head-only" / "results.json").read_text())
    assert val_run["train_config"]["lr"] == 0.01
    assert val_run["evaluated"] == "last" and val_run["accuracy_matrix"][0] == [None, None]  # tuning reads the final row only
    described = json.loads((tmp_path / "tune" / "lr-0.01" / "manifest.json").read_text())["tasks"]
    assert all(t["evaluated_on"] == "validation" and t["test_size"] == t["val_size"] for t in described)
    for s in (0, 1):
        run = json.loads((tmp_path / f"seed-{s}" / "head-only" / "results.json").read_text())
        assert run["train_config"]["lr"] == tuned["head-only"]["lr"] and run["train_config"]["seed"] == s
        assert run["evaluated"] == "each" and None not in run["accuracy_matrix"][1]
    assert "chosen on the validation split" in md
    assert tuned["head-only"]["at_grid_edge"] and "(grid edge)" in md  # either rate of two is an edge: say so
    compare("tiny-val", ["sd-lora"], [0], fast_cfg, tmp_path / "sd", model_path=tiny_model_dir, progress=False,
            log=lambda *_: None, tune_lrs=[1e-2], method_configs={"sd-lora": {"r": 4}})
    sd = json.loads((tmp_path / "sd" / "compare.json").read_text())["tuned_lr"]["sd-lora"]
    assert set(sd["validation_final_accuracy"]) == {"0.01", "0.1 sgd"}  # AdamW, and its official SGD at 10x the grid
    run = json.loads((tmp_path / "sd" / "seed-0" / "sd-lora" / "results.json").read_text())
    assert run["train_config"]["optimizer"] == sd["optimizer"]
    # one rate per optimiser: no grid to widen (an edge is judged within the chosen optimiser's grid, not across both)
    assert sd["at_grid_edge"] is False and "(grid edge)" not in (tmp_path / "sd" / "compare.md").read_text()
    compare("tiny-val", ["sd-lora"], [0], fast_cfg, tmp_path / "sd2", model_path=tiny_model_dir, progress=False,
            log=lambda *_: None, tune_lrs=[1e-2], tune_sgd_lrs=[0.05], method_configs={"sd-lora": {"r": 4}})
    sd = json.loads((tmp_path / "sd2" / "compare.json").read_text())["tuned_lr"]["sd-lora"]
    assert set(sd["validation_final_accuracy"]) == {"0.01", "0.05 sgd"}  # SGD at the rates given
    with pytest.raises(ValueError, match="--tune-sgd-lr needs positive"):
        compare("tiny-val", ["sd-lora"], [0], fast_cfg, tmp_path / "sd", model_path=tiny_model_dir, progress=False,
                log=lambda *_: None, tune_lrs=[1e-2], tune_sgd_lrs=[-1.0])
    with pytest.raises(ValueError, match="no validation split"):
        compare("tiny-noval", ["head-only"], [0], fast_cfg, tmp_path / "x", model_path=tiny_model_dir, progress=False,
                log=lambda *_: None, tune_lrs=[1e-2])


def test_resume_accepts_a_rate_equal_to_round_off_and_refuses_another(tmp_path):
    from dataclasses import asdict, replace

    from sharecl.compare import _check_same_settings
    from sharecl.train import TrainConfig

    cfg = replace(TrainConfig(), lr=3e-3)
    done = {"train_config": {**asdict(cfg), "lr": 10 * 3e-4}, "config": {}}  # 0.0029999999999999996
    _check_same_settings(tmp_path / "r.json", done, cfg, "head-only", {})
    with pytest.raises(ValueError, match="other settings: lr="):
        _check_same_settings(tmp_path / "r.json", done, replace(cfg, lr=3.1e-3), "head-only", {})
