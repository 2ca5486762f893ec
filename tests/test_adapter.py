"""LoRA adapters in PEFT's format: merged on load exactly as PEFT merges them, or refused naming the field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llava_next
from conftest import reference_model
from llava_next.checkpoint import CheckpointError, map_weight_name

pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj", "linear_1"]  # q_proj and v_proj hit the vision tower too


def peft_adapter(base: Path, out: Path, edit: dict | None = None, **lora) -> Path:
    """An adapter made by PEFT on transformers' model of `base`, with random B (PEFT starts B at zero, which would
    make every scale look right). `edit` changes adapter_config.json after saving."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(reference_model(base), LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, **lora}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(out)
    if edit:
        path = out / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    return out


def peft_merged_state(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's own merge of the saved adapter, loaded from its files as a user would, in our weight names."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(reference_model(base), adapter).merge_and_unload()
    return {map_weight_name(k): v for k, v in merged.state_dict().items() if map_weight_name(k)}


@pytest.mark.parametrize("lora, edit", [
    ({}, None),
    ({"use_rslora": True}, None),  # alpha / sqrt(r)
    ({"rank_pattern": {"language_model.layers.0.self_attn.q_proj": 2, "v_proj": 6},  # a dotted suffix; a bare name
      "alpha_pattern": {r"layers\.1\.mlp\.down_proj": 3, "down_proj": 5, "linear_1": 16}}, None),  # first match wins
    ({"use_rslora": True, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 2}}, None),
    ({}, {"fan_in_fan_out": True}),  # PEFT resets it for nn.Linear targets: the same merge
], ids=["plain", "rslora", "patterns", "rslora+patterns", "fan_in_fan_out"])
def test_peft_adapter_merges_as_peft_merges_it(lora, edit, tiny, tmp_path):
    base = tiny("vicuna")
    adapter = peft_adapter(base, tmp_path / "adapter", edit, **lora)
    expected = peft_merged_state(base, adapter)
    # every weight under its checkpoint name (fused projections as views); the inference model leaves out the
    # vision blocks past the feature layer, so the adapter's updates there are not merged (nor needed)
    ours = llava_next.load(adapter, progress=False).model.checkpoint_weights()
    plain = llava_next.load(base, progress=False).model.checkpoint_weights()
    changed = [k for k in ours if not torch.equal(plain[k], expected[k])]
    assert any(k.startswith("vision_tower.") for k in changed) and any(k.startswith("language_model.") for k in changed)
    assert "multi_modal_projector.linear_1.weight" in changed
    for key, value in ours.items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("edit, field", [
    ({"use_dora": True}, "use_dora"),
    ({"bias": "lora_only"}, "bias"),
    ({"lora_bias": True}, "lora_bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    ({"layer_replication": [[0, 2]]}, "layer_replication"),
    ({"peft_type": "IA3"}, "peft_type"),
    ({"r": 0}, "r"),
])
def test_adapters_that_would_merge_wrongly_are_refused_naming_the_field(edit, field, tiny, tmp_path):
    adapter = peft_adapter(tiny("vicuna"), tmp_path / "adapter", edit)
    with pytest.raises(CheckpointError, match=rf"adapter_config.json: {field}\b"):
        llava_next.load(adapter, progress=False)


def test_adapter_weights_that_are_not_lora_matrices_are_refused(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = peft_adapter(tiny("vicuna"), tmp_path / "adapter")
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    key = next(k for k in weights if k.endswith("q_proj.lora_A.weight"))
    magnitude = key.replace("lora_A.weight", "lora_magnitude_vector")  # what DoRA adds
    save_file({**weights, magnitude: torch.ones(64)}, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="lora_magnitude_vector, which is not a plain LoRA"):
        llava_next.load(adapter, progress=False)
    save_file({k: v for k, v in weights.items() if k != key}, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="has a lora_B matrix but no lora_A"):
        llava_next.load(adapter, progress=False)


def test_loading_an_adapter_imports_nothing_from_training(tiny, tmp_path):
    adapter = peft_adapter(tiny("vicuna"), tmp_path / "adapter")
    code = ("import sys, llava_next; llava_next.load(sys.argv[1], progress=False); "
            "print(sorted(m for m in sys.modules if m.startswith('llava_next.train')))")
    result = subprocess.run([sys.executable, "-c", code, str(adapter)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
