"""Target matching agrees with PEFT's own rules; defaults per architecture family."""

import pytest
from torch import nn

from sharecl.inject import default_targets, find_targets, match_target

NAMES = ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value",
         "encoder.layer.10.attention.self.query", "model.layers.3.self_attn.q_proj", "query", "myquery",
         "encoder.layer.0.attention.output.dense"]


@pytest.mark.parametrize("targets", [["query", "value"], ["q_proj"], r".*\.layer\.1\d\..*query", "query",
                                     ["attention.self.query"], ["dense"]])
def test_matches_peft(targets):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    cfg = LoraConfig(target_modules=targets)
    for name in NAMES:
        assert match_target(name, targets) == bool(check_target_module_exists(cfg, name)), (targets, name)


def test_defaults_by_family():
    from transformers import BertConfig, BertModel, Dinov2Config, Dinov2Model

    bert = BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, vocab_size=50))
    assert default_targets(bert) == ["query", "value"]
    assert len(find_targets(bert, default_targets(bert))) == 2
    vit = Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14))
    assert default_targets(vit) == ["q_proj", "v_proj"] and len(find_targets(vit, ["q_proj", "v_proj"])) == 2


def test_no_match_is_a_clear_error():
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        find_targets(nn.Sequential(nn.Linear(2, 2)), ["query"])
    with pytest.raises(ValueError, match="pass target_modules"):
        default_targets(nn.Sequential(nn.Linear(2, 2)))


def _peft_all_linear(model) -> set[str]:
    """The modules PEFT's own ``target_modules="all-linear"`` adapts on ``model`` (a copy is wrapped)."""
    import copy

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules="all-linear"))
    prefix = "base_model.model."
    return {n[len(prefix):] for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and n.startswith(prefix)}


def test_all_linear_is_peft_choice_on_tiny_llama_and_bert():
    from transformers import BertConfig, BertModel

    from conftest import tiny_lm

    lm = tiny_lm().model
    mine = find_targets(lm, "all-linear")
    assert set(mine) == _peft_all_linear(lm)
    assert "lm_head" not in mine and len(mine) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert find_targets(lm, "ALL-LINEAR") == mine
    bert = BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, vocab_size=50))
    assert set(find_targets(bert, "all-linear")) == _peft_all_linear(bert)
    with pytest.raises(ValueError, match="resolve it with find_targets"):
        match_target("model.layers.0.self_attn.q_proj", "all-linear")


@pytest.mark.slow
def test_all_linear_is_peft_choice_on_smollm2():
    from sharecl.generation.lm import load_causal_lm

    model = load_causal_lm().model
    mine = find_targets(model, "all-linear")
    assert set(mine) == _peft_all_linear(model) and len(mine) == 30 * 7
