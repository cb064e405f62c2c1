"""Configs mean what they say, for every registered method: a passed config is copied, never
mutated; variant presets and overrides apply on top of it; every field the method runs with is
the one given (issue 32)."""

from __future__ import annotations

import dataclasses

import pytest

from conftest import tiny_lm
from sharecl.methods import METHODS

#: per config class, values other than the defaults (valid together)
CHANGED = {
    "ShareConfig": {"r": 4, "p": 3, "k": 6, "phi": 3, "lora_alpha": 8.0, "coeff_lr_ratio": 2.0, "phi_init": "top", "init": "previous"},
    "ShareFullConfig": {"r": 4, "p": 1, "k": 5, "old_task_steps": 3},
    "InfLoRAConfig": {"r": 4, "eps": 0.9, "lr": 3e-3},
    "SDLoRAConfig": {"r": 4, "lora_alpha": 8.0, "kd_threshold": 1e-3},
    "DualLoRAConfig": {"r": 4, "residual_rank": 2, "temperature": 0.2, "confidence": 0.6},
    "LoRAConfig": {"r": 4, "lora_alpha": 4.0, "lora_dropout": 0.1},
}
TRAINED = sorted(m for m, cls in METHODS.items() if cls.config_class is not None and cls.config_class.__name__ in CHANGED)


@pytest.mark.parametrize("name", TRAINED)
def test_every_field_is_the_one_given_and_the_given_config_is_untouched(name):
    cls = METHODS[name]
    given = cls.config_class(**CHANGED[cls.config_class.__name__])
    before = dataclasses.asdict(given)
    m = cls(tiny_lm(), seed=0, config=given)
    assert dataclasses.asdict(given) == before  # not mutated (target_modules stays None)
    preset = getattr(cls, "_variant", {})
    for f in dataclasses.fields(given):
        want = preset.get(f.name, before[f.name])
        if f.name == "target_modules":  # None: the family default, in the copy only (Share on a causal LM: all linear)
            assert m.config.target_modules == ("all-linear" if name.startswith("share") else ["q_proj", "v_proj"])
        elif want is None:
            continue  # None means "the documented default" (Share's family defaults, the run's lr)
        else:
            assert getattr(m.config, f.name) == want, (name, f.name)
    assert m.config is not given


@pytest.mark.parametrize("name", TRAINED)
def test_overrides_apply_on_top_of_a_passed_config(name):
    cls = METHODS[name]
    given = cls.config_class(**CHANGED[cls.config_class.__name__])
    m = cls(tiny_lm(), seed=0, config=given, r=5, target_modules=["q_proj"])
    assert m.config.r == 5 and m.config.target_modules == ["q_proj"] and given.r == 4
    changed = {k: v for k, v in CHANGED[cls.config_class.__name__].items() if k != "r"}
    assert all(getattr(m.config, k) == v for k, v in changed.items())


def test_sd_lora_variants_are_presets_on_the_config():
    import sharecl
    from sharecl.methods.sdlora import SDLoRAConfig

    for method, flag in (("sd-lora-kd", "kd"), ("sd-lora-rr", "rr")):
        lm = tiny_lm()
        cl = sharecl.wrap(lm.model, SDLoRAConfig(), method=method)
        assert getattr(cl.method.config, flag) is True and cl.method.name == method
    with pytest.raises(TypeError, match="takes a SDLoRAConfig"):
        METHODS["sd-lora"](tiny_lm(), seed=0, config=METHODS["share"].config_class())


def test_one_config_wraps_two_models_without_carrying_targets_over():
    """The first model's resolved targets must not leak into the second wrap through the config."""
    import sharecl
    from sharecl import ShareConfig

    cfg = ShareConfig(r=4, k=4, p=2)
    a = sharecl.wrap(tiny_lm().model, cfg)
    b = sharecl.wrap(tiny_lm(layers=3).model, cfg)
    assert cfg.target_modules is None
    assert len(a.method.layers) == 2 * 7 and len(b.method.layers) == 3 * 7  # every linear layer of 2 and 3 blocks
