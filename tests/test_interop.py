"""PEFT round trips: export a Share task, load it with PEFT; fold a PEFT adapter in."""

import json

import pytest
import torch

from conftest import make_task
from sharecl.interop.peft import AdapterError, export_task, read_lora_adapter


def _peft_hidden(model_dir, adapter_dir, batch):
    from peft import PeftModel
    from transformers import AutoModel

    base = AutoModel.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(**batch).last_hidden_state


def test_exported_task_loads_in_peft_and_reproduces_outputs(tiny_share, fast_cfg, tiny_model_dir, tmp_path):
    m = tiny_share
    tasks = [make_task("a"), make_task("b", seed=1)]
    for t in tasks:
        m.learn(t, fast_cfg, progress=False)
    for i, t in enumerate(tasks):
        out = export_task(m, t.name, tmp_path / t.name)
        batch = m.encoder.tokenize(t.test_inputs)
        with m.task(m.task_names[i]):
            with torch.no_grad():
                want = m.encoder.model(**batch).last_hidden_state
        got = _peft_hidden(tiny_model_dir, out, batch)
        assert (got - want).abs().max().item() <= 1e-5
        assert json.loads((out / "classes.json").read_text())["classes"] == m.task_classes[t.name]
    with pytest.raises(FileExistsError):
        export_task(m, "a", tmp_path / "a")


@pytest.mark.parametrize("alpha,rslora,scaling", [(4, False, 2.0), (3, False, 1.5), (5, True, 5 / 2 ** 0.5)])
def test_peft_adapter_folds_in_and_round_trips(tiny_share, fast_cfg, tiny_model_dir, tmp_path, alpha, rslora, scaling):
    """A real PEFT LoRA saved by PEFT, folded into Share with k large enough, reproduces PEFT's
    outputs, whatever its scale (``lora_alpha / r`` equal to Share's or not, or rsLoRA's
    ``lora_alpha / √r``) — Share's own scale is 8 / 4 = 2."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    torch.manual_seed(0)
    base = AutoModel.from_pretrained(tiny_model_dir)
    pm = get_peft_model(base, LoraConfig(r=2, lora_alpha=alpha, use_rslora=rslora, target_modules=["query", "value"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    pm.save_pretrained(tmp_path / "ext")
    lora = read_lora_adapter(tmp_path / "ext")
    assert lora.rank == 2 and lora.scaling == pytest.approx(scaling) and len(lora.factors) == 4
    m = tiny_share
    m.add_adapter("ext", lora.factors, lora.scaling)
    batch = m.encoder.tokenize(["a river of apples", "the engine"])
    with m.task(m.task_names[0]):
        with torch.no_grad():
            got = m.encoder.model(**batch).last_hidden_state
    pm.eval()
    with torch.no_grad():
        want = pm(**batch).last_hidden_state
    assert (got - want).abs().max().item() <= 1e-5


def test_bad_adapter_directories(tmp_path):
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        read_lora_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(AdapterError, match="never unpickles"):
        read_lora_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterError, match="damaged or not safetensors"):
        read_lora_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(AdapterError, match="only LoRA"):
        read_lora_adapter(tmp_path)
