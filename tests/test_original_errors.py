"""Original-layout configs that cannot work get an error naming the field and what is supported, before any
weight is read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import llava_next
from llava_next.errors import LlavaError

ORIGINAL = Path(__file__).resolve().parent / "original"
TOWER = ORIGINAL / "clip-tiny-336"

CASES = {
    "projector_identity": ({"mm_projector_type": "identity"}, r"mm_projector_type 'identity'.*linear, mlpNx_gelu"),
    "projector_garbage": ({"mm_projector_type": "mlp0x_gelu"}, r"mm_projector_type"),
    "anyres_max": ({"image_aspect_ratio": "anyres_max_9"}, r"image_aspect_ratio 'anyres_max_9'.*square, pad, anyres"),
    "merge_unknown": ({"mm_patch_merge_type": "spatial_unpad_max"}, r"mm_patch_merge_type 'spatial_unpad_max'"),
    "select_feature": ({"mm_vision_select_feature": "cls"}, r"mm_vision_select_feature 'cls'"),
    "select_layer": ({"mm_vision_select_layer": -9}, r"mm_vision_select_layer -9.*3-layer tower"),
    "hidden_size": ({"mm_hidden_size": 1024}, r"mm_hidden_size 1024.*width of the vision tower.*32"),
    "model_type": ({"model_type": "llava_mpt"}, r"model_type 'llava_mpt'.*llava_llama"),
    "anyres_without_pinpoints": ({"image_aspect_ratio": "anyres", "image_grid_pinpoints": None},
                                 r"anyres.*image_grid_pinpoints"),
    "pinpoints_garbage": ({"image_aspect_ratio": "anyres", "image_grid_pinpoints": [[336]]},
                          r"image_grid_pinpoints.*\[width, height\]"),
    "pinpoints_not_tiles": ({"image_aspect_ratio": "anyres", "image_grid_pinpoints": [[300, 500]]},
                           r"image_grid_pinpoints"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_config_that_cannot_work_is_named(name, tmp_path):
    change, message = CASES[name]
    target = tmp_path / "llava-v1.5-tiny"
    shutil.copytree(ORIGINAL / "llava-v1.5-tiny", target)
    config = json.loads((target / "config.json").read_text())
    config.update(change)
    config = {k: v for k, v in config.items() if v is not None}
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(LlavaError, match=message):
        llava_next.load(target, progress=False, vision_tower=TOWER)


def test_vision_tower_and_template_flags_are_refused_for_llava_hf_checkpoints():
    with pytest.raises(LlavaError, match="original LLaVA code only"):
        llava_next.load("demo", progress=False, conv_template="llava_v1")


def test_an_original_checkpoint_quantizes_at_load_but_is_not_saved_quantized(tmp_path):
    from llava_next.pipeline import save_quantized
    from llava_next.quantize import QuantizeError

    pipe = llava_next.load(ORIGINAL / "llava-v1.5-tiny", progress=False, vision_tower=TOWER, quantize="int8")
    assert pipe.quantization["mode"] == "int8"
    assert len(pipe.generate("<image>\nWhat is it?", [ORIGINAL.parent.parent / "examples" / "shapes.png"],
                             max_new_tokens=2).token_ids) == 2
    with pytest.raises(QuantizeError, match="original LLaVA code.*llava-next convert"):
        save_quantized(pipe, tmp_path / "q")


def test_the_templates_end_of_turn_token_ends_an_answer_where_the_tokenizer_has_it():
    from tokenizers import AddedToken

    from llava_next.original import end_of_turn_ids

    pipe = llava_next.load(ORIGINAL / "llava-v1.5-tiny", progress=False, vision_tower=TOWER)
    assert 2 in pipe.engine.eos_token_ids  # llava_v1 ends a turn with </s>, the EOS
    tokenizer = pipe.processor.tokenizer
    tokenizer.backend.add_special_tokens([AddedToken("<|im_end|>", special=True, normalized=False)])
    layout = pipe.original
    layout.conv_template = "chatml_direct"
    assert end_of_turn_ids(layout, tokenizer) == [tokenizer.token_id("<|im_end|>")]
    layout.conv_template = "mistral_instruct"  # no separator: nothing beyond EOS
    assert end_of_turn_ids(layout, tokenizer) == []


def test_a_prompt_the_original_would_cut_at_tokenizer_model_max_length_is_refused(tmp_path):
    # The original cuts the merged sequence at tokenizer_model_max_length, even at inference (recorded: two images
    # on the flat checkpoint with 4096 lose the end of the prompt). A silently cut prompt is refused here instead.
    import sys

    sys.path.insert(0, str(ORIGINAL))
    from synthetic_images import make_image

    recorded = json.loads((ORIGINAL / "reference" / "llava-llama-2-flat-tiny.json").read_text())["truncation_at_4096"]
    target = tmp_path / "llava-llama-2-flat-tiny"
    shutil.copytree(ORIGINAL / "llava-llama-2-flat-tiny", target)
    config = json.loads((target / "config.json").read_text())
    config["tokenizer_model_max_length"] = recorded["tokenizer_model_max_length"]
    (target / "config.json").write_text(json.dumps(config))
    pipe = llava_next.load(target, progress=False, vision_tower=ORIGINAL / "clip-tiny-336")
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "What differs?"}]
    images = [make_image(500, 316), make_image(47, 1128)]
    with pytest.raises(LlavaError, match=r"over this checkpoint's tokenizer_model_max_length of 4096.*would cut"):
        pipe.generate([{"role": "user", "content": content}], images, max_new_tokens=1)
    assert len(pipe.generate([{"role": "user", "content": content[1:]}], images[:1], max_new_tokens=1).token_ids) == 1


def test_a_renamed_folder_whose_name_picks_the_first_llavas_template_is_warned_about(tmp_path, capsys):
    import warnings

    from llava_next import cli
    from llava_next.errors import LlavaWarning

    renamed = tmp_path / "ckpt"  # llava-v1.6-mistral-tiny, downloaded into a folder of another name
    shutil.copytree(ORIGINAL / "llava-v1.6-mistral-tiny", renamed)
    with pytest.warns(LlavaWarning, match=r"its name 'ckpt', so it is llava_v0.*llava_mistral checkpoint's "
                                          r"mlp2x_gelu projector.*--conv-template mistral_instruct"):
        assert llava_next.load(renamed, progress=False, vision_tower=TOWER).original.conv_template == "llava_v0"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither the template named, nor a name that picks one, nor the first LLaVA
        llava_next.load(renamed, progress=False, vision_tower=TOWER, conv_template="mistral_instruct")
        llava_next.load(ORIGINAL / "llava-v1.6-mistral-tiny", progress=False, vision_tower=TOWER)
        shutil.copytree(ORIGINAL / "llava-v0-tiny", tmp_path / "first")
        llava_next.load(tmp_path / "first", progress=False, vision_tower=ORIGINAL / "clip-tiny-224")
    for _ in range(2):  # each run of the command says it, not only the process's first
        assert cli.main(["info", "--model", str(renamed), "--vision-tower", str(TOWER)]) == 0
        assert capsys.readouterr().err.startswith(f"llava-next: warning: {renamed}: no conversation template matches")
    from llava_next.original import read_layout

    config = {**json.loads((renamed / "config.json").read_text()), "model_type": "llava_qwen"}
    with pytest.warns(LlavaWarning, match="llava_qwen checkpoint's .* --conv-template qwen_1_5 "):
        read_layout(renamed, config, str(renamed), str(TOWER))  # (the layout alone: the weights are llama's)


def test_the_tower_given_instead_of_mm_vision_tower_is_named_as_given():
    with pytest.raises(LlavaError, match=r"the vision tower '\S*nope' given with --vision-tower .* could not be "
                                         r"found .*; give a CLIP checkpoint's directory or Hub id"):
        llava_next.load(ORIGINAL / "llava-v1.5-tiny", progress=False, vision_tower=ORIGINAL / "nope")
    given = llava_next.load(ORIGINAL / "llava-v1.6-vicuna-tiny", progress=False, vision_tower=TOWER)
    assert given.original.rules()["vision tower"] == f"{TOWER} (given with --vision-tower; its weights from the " \
                                                      "checkpoint itself)"
