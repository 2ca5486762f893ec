"""Configs with omitted defaults, every weight layout, strict loading, and the errors users meet."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import llava_next
from conftest import SPECS, reference_model
from llava_next.checkpoint import CheckpointError, map_weight_name, resolve_checkpoint
from llava_next.config import ConfigError, llava_config_from_hf, read_config, to_hf_dict


@pytest.mark.parametrize("name", [n for n in SPECS if n.startswith("v4_")] + ["qwen2_window", "llama3_rope"])
def test_config_values_equal_what_transformers_reads(name, tiny):
    from transformers import AutoConfig

    directory = tiny(name)
    ours = read_config(directory / "config.json")
    theirs = AutoConfig.from_pretrained(directory)
    t, tt = ours.text, theirs.text_config
    assert (t.vocab_size, t.hidden_size, t.intermediate_size, t.num_layers) == (
        tt.vocab_size, tt.hidden_size, tt.intermediate_size, tt.num_hidden_layers)
    assert (t.num_heads, t.num_kv_heads, t.rms_norm_eps) == (tt.num_attention_heads, tt.num_key_value_heads, tt.rms_norm_eps)
    assert t.head_dim == (getattr(tt, "head_dim", None) or tt.hidden_size // tt.num_attention_heads)
    assert t.rope.theta == tt.rope_parameters["rope_theta"] and t.rope.type == tt.rope_parameters["rope_type"]
    windows = [t.layer_window(i) for i in range(t.num_layers)]
    if tt.model_type == "qwen2":
        assert windows == [tt.sliding_window if kind == "sliding_attention" else None for kind in tt.layer_types]
    else:
        assert windows == [getattr(tt, "sliding_window", None)] * t.num_layers
    v, tv = ours.vision, theirs.vision_config
    assert (v.hidden_size, v.num_layers, v.num_heads, v.image_size, v.patch_size) == (
        tv.hidden_size, tv.num_hidden_layers, tv.num_attention_heads, tv.image_size, tv.patch_size)


def test_sparse_config_really_omits_the_defaults(tiny):
    text = json.loads((tiny("v4_mistral") / "config.json").read_text())["text_config"]
    assert "rope_theta" not in text and "hidden_act" not in text and text["sliding_window"] is None


def test_real_llava_hf_config_shapes_are_read_with_their_class_defaults():
    # llava-1.5-7b-hf's config.json says almost nothing about its llama: everything else is LlamaConfig's default.
    cfg = llava_config_from_hf({
        "model_type": "llava", "image_token_index": 32000, "pad_token_id": 32001, "projector_hidden_act": "gelu",
        "text_config": {"model_type": "llama", "max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
                        "vocab_size": 32064, "torch_dtype": "float16"},
        "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                          "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                          "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
    })
    assert (cfg.text.hidden_size, cfg.text.intermediate_size, cfg.text.num_layers) == (4096, 11008, 32)
    assert (cfg.text.num_heads, cfg.text.num_kv_heads, cfg.text.head_dim) == (32, 32, 128)
    assert cfg.text.rope.theta == 10000.0 and cfg.text.vocab_size == 32064 and cfg.base_tokens_per_tile == 576
    mistral = llava_config_from_hf({"model_type": "llava_next", "text_config": {"model_type": "mistral"}})
    assert mistral.text.num_kv_heads == 8 and mistral.text.sliding_window == 4096
    assert mistral.image_grid_pinpoints[0] == (336, 672)
    qwen = llava_config_from_hf({"model_type": "llava_next", "text_config": {"model_type": "qwen2"}})
    assert qwen.text.qkv_bias and not qwen.text.o_bias and qwen.text.sliding_window is None


@pytest.mark.parametrize("change,message", [
    ({"model_type": "llava_onevision"}, "model_type 'llava_onevision' is not a LLaVA checkpoint"),
    ({"text_config": {"model_type": "gemma"}}, "text model_type 'gemma' is not supported"),
    ({"text_config": {"model_type": "llama", "rope_scaling": {"type": "yarn", "factor": 4.0}}},
     "rope scaling type 'yarn' is not supported"),
    ({"text_config": {"model_type": "llama", "rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4}}},
     "rope scaling type 'dynamic' is not supported"),
    ({"vision_config": {"model_type": "siglip_vision_model"}}, "vision model_type 'siglip_vision_model'"),
    ({"vision_feature_layer": 40}, "vision_feature_layer 40 is outside a 24-layer tower"),
    ({"vision_feature_select_strategy": "cls"}, "must be 'default' or 'full'"),
])
def test_unsupported_configs_are_clear_errors(change, message):
    base = {"model_type": "llava_next", "text_config": {"model_type": "llama"}}
    with pytest.raises(ConfigError, match=message):
        llava_config_from_hf({**base, **change})


@pytest.mark.parametrize("name", ["vicuna", "qwen2_window", "llama3_rope", "llava15_full", "vicuna_layers"])
def test_written_config_reads_back_equal_and_transformers_reads_it_alike(name, tiny, tmp_path):
    from transformers import AutoConfig

    cfg = read_config(tiny(name) / "config.json")
    (tmp_path / "config.json").write_text(json.dumps(to_hf_dict(cfg)))
    again = read_config(tmp_path / "config.json")
    cfg.torch_dtype = again.torch_dtype = None
    assert again == cfg
    theirs = AutoConfig.from_pretrained(tmp_path)
    assert theirs.text_config.rope_parameters["rope_theta"] == cfg.text.rope.theta
    assert theirs.vision_feature_layer == cfg.vision_feature_layer


def test_weight_name_mapping_covers_every_layout():
    assert map_weight_name("vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight") == \
        "vision_tower.encoder.layers.0.mlp.fc1.weight"
    assert map_weight_name("vision_tower.encoder.layers.0.mlp.fc1.weight") == "vision_tower.encoder.layers.0.mlp.fc1.weight"
    assert map_weight_name("language_model.model.layers.1.self_attn.q_proj.weight") == \
        "language_model.layers.1.self_attn.q_proj.weight"
    assert map_weight_name("language_model.lm_head.weight") == "lm_head.weight"
    assert map_weight_name("model.language_model.norm.weight") == "language_model.norm.weight"
    assert map_weight_name("model.vision_tower.vision_model.pre_layrnorm.bias") == "vision_tower.pre_layrnorm.bias"
    assert map_weight_name("model.image_newline") == "image_newline"
    assert map_weight_name("lm_head.weight") == "lm_head.weight"
    assert map_weight_name("vision_tower.vision_model.embeddings.position_ids") is None


def test_transformers_in_memory_layout_loads_too(tiny, tmp_path):
    """A checkpoint saved from a state_dict (model.language_model.*, lm_head.weight) gives the same logits."""
    source = tiny("mistral")
    target = tmp_path / "in_memory"
    shutil.copytree(source, target)
    (target / "model.safetensors").unlink()
    state = {k: v.contiguous() for k, v in reference_model(source).state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in state)
    save_file(state, str(target / "model.safetensors"))
    a, b = llava_next.load(source, progress=False), llava_next.load(target, progress=False)
    for (name, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), name


def _copy_with_weights(source, target, edit):
    shutil.copytree(source, target)
    state = load_file(str(target / "model.safetensors"))
    edit(state)
    save_file(state, str(target / "model.safetensors"))
    return target


def test_missing_weight_is_an_error_naming_it(tiny, tmp_path):
    target = _copy_with_weights(tiny("mistral"), tmp_path / "m",
                                lambda s: s.pop("multi_modal_projector.linear_2.bias"))
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: multi_modal_projector.linear_2.bias"):
        llava_next.load(target, progress=False)


def test_unexpected_weight_is_an_error_naming_it(tiny, tmp_path):
    target = _copy_with_weights(tiny("mistral"), tmp_path / "u",
                                lambda s: s.update({"language_model.model.layers.9.mlp.up_proj.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"not in the model: language_model.model.layers.9.mlp.up_proj.weight"):
        llava_next.load(target, progress=False)


def test_shape_mismatch_is_an_error(tiny, tmp_path):
    target = _copy_with_weights(tiny("mistral"), tmp_path / "s",
                                lambda s: s.update({"image_newline": torch.zeros(7)}))
    with pytest.raises(CheckpointError, match=r"image_newline: checkpoint \(7,\) vs model \(64,\)"):
        llava_next.load(target, progress=False)


def test_tied_checkpoint_has_no_lm_head_and_still_loads(tiny, load_pipeline):
    directory = tiny("vicuna_tied")
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        assert not any("lm_head" in k for k in f.keys())
    model = load_pipeline(directory).model
    assert model.lm_head.weight is model.language_model.embed_tokens.weight


def test_legacy_bin_weights_load_as_the_safetensors_do(tiny, tmp_path):
    target = tmp_path / "pickled"
    shutil.copytree(tiny("mistral"), target)
    state = load_file(str(target / "model.safetensors"))
    (target / "model.safetensors").unlink()
    names = sorted(state)
    torch.save({k: state[k] for k in names[: len(names) // 2]}, target / "pytorch_model-00001-of-00002.bin")
    torch.save({k: state[k] for k in names[len(names) // 2:]}, target / "pytorch_model-00002-of-00002.bin")
    (target / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        k: f"pytorch_model-0000{1 + (i >= len(names) // 2)}-of-00002.bin" for i, k in enumerate(names)}}))
    want = llava_next.load(tiny("mistral"), dtype="float32", progress=False).model.state_dict()
    got = llava_next.load(target, dtype="float32", progress=False).model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_bin_weights_that_would_run_code_are_refused_unrun(tiny, tmp_path):
    from hostile_corpus import _bin_that_runs_code

    mark = Path("/tmp/llava-next-pickle-ran-code")
    mark.unlink(missing_ok=True)
    target = tmp_path / "evil"
    shutil.copytree(tiny("mistral"), target)
    _bin_that_runs_code(target)
    with pytest.raises(CheckpointError, match="pytorch_model.bin: not a PyTorch weight file that can be read as plain"):
        llava_next.load(target, progress=False)
    assert not mark.exists()


def test_missing_shard_is_named(tiny, tmp_path):
    target = tmp_path / "sharded"
    shutil.copytree(tiny("vicuna_sharded"), target)
    (target / "model-00002-of-00007.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00007.safetensors"):
        llava_next.load(target, progress=False)


def test_hub_id_without_network_says_how_to_use_a_local_copy(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match=r"could not download 'llava-hf/llava-v1.6-mistral-7b-hf'.*--local-dir"):
        resolve_checkpoint("llava-hf/llava-v1.6-mistral-7b-hf")


def test_paths_that_are_not_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="has no config.json"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        resolve_checkpoint(tmp_path / "file.txt")
    with pytest.raises(CheckpointError, match="neither an existing directory nor a Hub id"):
        resolve_checkpoint("./no/such/dir")


@pytest.mark.parametrize("stored_dtype, target_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                        (torch.float16, torch.float16)])
def test_a_tensor_is_read_a_slice_at_a_time_with_the_values_of_a_whole_read(stored_dtype, target_dtype, tmp_path,
                                                                           monkeypatch):
    import llava_next.checkpoint as checkpoint

    stored = {"a": torch.randn(37, 29).to(stored_dtype), "b": torch.randn(5).to(stored_dtype)}
    save_file(stored, tmp_path / "w.safetensors")
    monkeypatch.setattr(checkpoint, "CONVERT_SLICE_BYTES", 3 * 64 + 2)  # slices that end inside rows and elements
    for tensor in checkpoint.read_safetensors_index(tmp_path / "w.safetensors"):
        expected = stored[tensor.name].to(target_dtype)
        contiguous = torch.full(tensor.shape, float("nan"), dtype=target_dtype)
        tensor.read_into(contiguous)
        assert torch.equal(contiguous, expected)
        strided = torch.full(tensor.shape[::-1], float("nan"), dtype=target_dtype).t()  # not contiguous
        tensor.read_into(strided)
        assert torch.equal(strided, expected)


def test_a_weight_stored_twice_is_an_error(tiny, tmp_path):
    target = _copy_with_weights(tiny("mistral"), tmp_path / "d", lambda s: None)
    weights = load_file(target / "model.safetensors")
    (target / "model.safetensors").rename(target / "model-a.safetensors")  # shards without an index: both read
    save_file({"multi_modal_projector.linear_2.bias": weights["multi_modal_projector.linear_2.bias"]},
              target / "model-b.safetensors")
    with pytest.raises(CheckpointError, match=r"stored more than once: multi_modal_projector.linear_2.bias"):
        llava_next.load(target, progress=False)


def test_a_pytorch_file_in_the_format_before_zip_is_read_not_mapped(tmp_path):
    from llava_next.checkpoint import read_pickle_index

    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.arange(6.0).view(2, 3)}, path, _use_new_zipfile_serialization=False)
    tensors = read_pickle_index(path)  # torch.load cannot map this format: it said "truncated or damaged" before
    assert [t.name for t in tensors] == ["w"] and torch.equal(tensors[0].read(), torch.arange(6.0).view(2, 3))
