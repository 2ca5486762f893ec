"""Quantized and fast linears against their dequantized references; quantized models against float ones; quantized
checkpoints written once and read back."""

from __future__ import annotations

import math
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import llava_next
from conftest import smooth_image
from llava_next.cli import main
from llava_next.pipeline import save_quantized
from llava_next.quantize import (BLOCKED_ROWS, DECODE_ROWS, INT4_KERNEL_ROWS, INT8_KERNEL_ROWS, FastLinear, Int4Linear,
                                 Int8Linear, QuantizeError, W8A8Linear, block_int8_columns, can_pack, convert_linears,
                                 cpu_int4_layout_is_known, dequantize_int4, dequantize_int4_transposed, int4_weights,
                                 int8_weights, pack_nibbles, quantized_state, unpack_cpu_int4_transposed,
                                 unpack_nibbles)


def linear(in_features=256, out_features=96, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    return layer.to(dtype)


def relative_error(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.mark.parametrize("rows", [1, 3, DECODE_ROWS + 5, INT8_KERNEL_ROWS + 1])  # kernels, and the prompt path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_equals_its_dequantized_weights(rows, dtype):
    base = linear(dtype=dtype)
    q, scales = int8_weights(base.weight)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    dequantized = (q.float() * scales[:, None]).to(dtype)
    assert relative_error(dequantized, base.weight) < 1 / 127  # rounding to 255 levels per row
    module = Int8Linear.from_linear(base)
    x = torch.randn(2, rows, 256).to(dtype)
    with torch.inference_mode():
        expected = F.linear(x.float(), (module.weight.float() * module.scales.to(dtype).float()[:, None]), base.bias.float())
        assert relative_error(module(x), expected) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("rows", [1, DECODE_ROWS + 1, INT4_KERNEL_ROWS + 1])  # kernel, and the prompt path
@pytest.mark.parametrize("group_size", [32, 128])
def test_int4_linear_equals_its_dequantized_weights(rows, group_size):
    base = linear(in_features=256, out_features=64)
    q, scales_and_zeros = int4_weights(base.weight, group_size)
    assert q.min() >= 0 and q.max() <= 15 and scales_and_zeros.shape == (256 // group_size, 64, 2)
    assert torch.equal(unpack_nibbles(pack_nibbles(q)), q)
    dequantized = dequantize_int4(pack_nibbles(q), scales_and_zeros, group_size, torch.float32)
    assert relative_error(dequantized, base.weight) < 0.1  # 16 levels per group
    module = Int4Linear.from_linear(base, group_size)
    x = torch.randn(rows, 256)
    with torch.inference_mode():
        assert relative_error(module(x), F.linear(x, dequantized, base.bias)) < 1e-5


@pytest.mark.parametrize("rows", [1, DECODE_ROWS + 7])  # a decoding step's one row too, not weight-only's forms
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_linear_equals_integer_arithmetic_done_by_hand(rows, dtype):
    base = linear(in_features=128, out_features=64, dtype=dtype)
    module = W8A8Linear.from_linear(base)
    x = torch.randn(rows, 128).to(dtype)
    x_scales = x.float().abs().amax(1, keepdim=True) / 127
    xq = torch.round(x.float() / x_scales).clamp(-127, 127)
    expected = (xq @ module.weight.float().t()) * x_scales * module.scales[None].float() + base.bias.float()
    # (in bfloat16 the product is rounded to it before each scale, as the layer rounds it)
    with torch.inference_mode():
        assert relative_error(module(x), expected) < (1e-5 if dtype == torch.float32 else 1e-2)
        # and it approximates the float layer
        assert relative_error(module(x), base(x)) < 0.03
    model = nn.Module()  # (never in column blocks, even as a decoder's layer: _int_mm is faster)
    model.language_model = nn.Module()
    model.language_model.proj = module
    assert not module.can_block() and block_int8_columns(model) == 0 and not module.blocked


def test_w8a8_decodes_a_few_rows_weight_only_and_one_row_in_the_form_asked_for():
    # _int_mm is slower than int8's weight-only kernel for 2..DECODE_ROWS rows: those take the kernel; one row takes
    # the form the engine measured faster (`one_row_int8`), which a scheduler of several slots turns off
    base = linear(in_features=128, out_features=64, dtype=torch.bfloat16)
    w8a8, weight_only = W8A8Linear.from_linear(base), Int8Linear.from_linear(base)
    assert torch.equal(w8a8.weight, weight_only.weight)
    x = torch.randn(DECODE_ROWS + 1, 128).bfloat16()
    with torch.inference_mode():
        for rows in (2, DECODE_ROWS):
            assert torch.equal(w8a8(x[:rows]), weight_only(x[:rows])), rows
        assert not torch.equal(w8a8(x[:1]), weight_only(x[:1]))  # int8 activations
        assert not torch.equal(w8a8(x), weight_only(x))
        w8a8.one_row_int8 = False
        assert torch.equal(w8a8(x[:1]), weight_only(x[:1])) and torch.equal(w8a8(x[:1]), w8a8(x[:2])[:1])
    with pytest.raises(QuantizeError, match="w8a8 weights stay in the plain layout"):
        w8a8.block_columns()


def test_fast_linear_is_the_same_linear():
    base = linear()
    fast = FastLinear(base)
    assert fast.weight is base.weight
    x = torch.randn(5, 7, 256)
    with torch.inference_mode():
        assert relative_error(fast(x), base(x)) < 1e-6


@pytest.mark.skipif(not can_pack(torch.ones(1, dtype=torch.bfloat16)), reason="no native bfloat16 oneDNN here")
def test_a_packed_bfloat16_fast_linear_gives_nn_linears_values_bit_for_bit():
    base = linear(dtype=torch.bfloat16)
    fast = FastLinear(base, packed=True)
    assert fast.weight.is_mkldnn and torch.equal(fast.weight.to_dense(), base.weight)
    for rows in (1, 3, 40):
        x = torch.randn(2, rows, 256).to(torch.bfloat16)
        with torch.inference_mode():
            assert torch.equal(fast(x), base(x))
        assert torch.equal(fast(x), base(x))  # with autograd on, through the dense weight


@pytest.mark.skipif(not can_pack(torch.ones(1, dtype=torch.bfloat16)), reason="no native bfloat16 oneDNN here")
def test_loading_packs_prompt_only_weights_and_decoding_ones_as_the_layout_chosen_before_loading_says(tiny, monkeypatch):
    import llava_next.engine

    # loading packs the prompt-only layers, and the decoding ones only where the layout chosen before loading is the
    # blocked one: here a measuring load (this test's own layout cache, conftest.py) that timed plain faster
    monkeypatch.setattr(llava_next.engine, "BF16_LAYOUT", "measure")
    monkeypatch.setattr(llava_next.engine, "time_bf16_layouts", lambda model: {"blocked": 2.0, "plain": 1.0})
    pipe = llava_next.load(tiny("vicuna_tied"), dtype="bfloat16", progress=False)
    assert pipe.engine.bf16_layout_reason.startswith("measured by load 1")
    model = pipe.model
    assert model.lm_head.weight is model.language_model.embed_tokens.weight  # one copy, still shared
    qkv = model.language_model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, FastLinear) and not qkv.weight.is_mkldnn
    vision = [m for m in model.vision_tower.modules() if isinstance(m, FastLinear)]
    assert vision and all(m.weight.is_mkldnn for m in vision)
    monkeypatch.setattr(llava_next.engine, "BF16_LAYOUT", "blocked")  # set: laid out while loading
    pipe = llava_next.load(tiny("vicuna_tied"), dtype="bfloat16", progress=False)
    qkv = pipe.model.language_model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, FastLinear) and qkv.weight.is_mkldnn
    assert pipe.model.lm_head.weight is pipe.model.language_model.embed_tokens.weight


@pytest.mark.parametrize("mode, bound", [("int8", 0.02), ("w8a8", 0.05), ("int4", 0.25)])
def test_quantized_models_stay_close_to_float(mode, bound, tiny):
    directory = tiny("vicuna")
    full = llava_next.load(directory, dtype="float32", progress=False)
    quantized = llava_next.load(directory, dtype="float32", progress=False, quantize=mode,
                                **({"group_size": 32} if mode == "int4" else {}))
    assert set(quantized.quantization["layers"]) == {n for n, m in full.model.named_modules()
                                                     if isinstance(m, (nn.Linear, FastLinear)) and
                                                     (n.startswith("language_model.") or n == "lm_head" or
                                                      (mode == "w8a8" and not n.startswith("language_model.")))}
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    inputs, _ = full.prepare(messages, [smooth_image(500, 316)])
    with torch.inference_mode():
        error = relative_error(quantized.model(**inputs, logits_to_keep=1), full.model(**inputs, logits_to_keep=1))
    assert 0 < error < bound


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_weight_only_modes_run_the_vision_tower_as_the_bfloat16_mode_does(mode, tiny, tmp_path):
    # int8 and int4 leave the vision tower and projector in float; on the CPU in oneDNN's blocked layout, as bfloat16
    # has them, so an image's features are bfloat16's bit for bit; and only the quantized layers count as quantized
    if not can_pack(torch.empty(0, dtype=torch.bfloat16)):
        pytest.skip("no native bfloat16 here: the layers stay nn.Linear")
    directory = tiny("vicuna")
    bf16 = llava_next.load(directory, dtype="bfloat16", progress=False)
    quantized = llava_next.load(directory, dtype="bfloat16", progress=False, quantize=mode,
                                **({"group_size": 32} if mode == "int4" else {}))
    prompt_layers = {n: m for n, m in quantized.model.named_modules() if isinstance(m, (nn.Linear, FastLinear))
                     and n.startswith(("vision_tower.", "multi_modal_projector."))}
    assert prompt_layers and all(isinstance(m, FastLinear) and m.packed for m in prompt_layers.values())
    assert not set(prompt_layers) & set(quantized.quantization["layers"])
    assert set(quantized.quantization["layers"].values()) <= {"int8", "int4/g32"}
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    inputs, _ = bf16.prepare(messages, [smooth_image(500, 316)])
    with torch.inference_mode():
        ours = quantized.model.image_features(inputs["pixel_values"], inputs.get("image_sizes"))
        theirs = bf16.model.image_features(inputs["pixel_values"], inputs.get("image_sizes"))
    assert len(ours) == len(theirs) and all(torch.equal(a, b) for a, b in zip(ours, theirs))
    # written out and read back, the same: the blocked weights are saved as plain ones, and laid out again
    save_quantized(quantized, tmp_path / "q")
    reloaded = llava_next.load(tmp_path / "q", progress=False)
    assert reloaded.quantization == quantized.quantization
    assert all(isinstance(reloaded.model.get_submodule(n), FastLinear) and reloaded.model.get_submodule(n).packed
               for n in prompt_layers)
    with torch.inference_mode():
        assert torch.equal(reloaded.model(**inputs), quantized.model(**inputs))


def test_a_quantized_checkpoint_reads_back_as_it_was_written(tiny, tmp_path, capsys):
    directory = tiny("qwen2")
    quantized = llava_next.load(directory, progress=False, quantize="int4", group_size=32)
    assert main(["quantize", "--model", str(directory), "--quantize", "int4", "--group-size", "32",
                 "--out", str(tmp_path / "q")]) == 0
    assert "int4/g32" in capsys.readouterr().out
    reloaded = llava_next.load(tmp_path / "q", progress=False)
    assert reloaded.quantization == quantized.quantization
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    inputs, _ = quantized.prepare(messages, [smooth_image(300, 200)])
    with torch.inference_mode():
        assert torch.equal(reloaded.model(**inputs), quantized.model(**inputs))
    assert reloaded.generate(messages, [smooth_image(300, 200)], max_new_tokens=6).token_ids == \
        quantized.generate(messages, [smooth_image(300, 200)], max_new_tokens=6).token_ids
    weights = sum(f.stat().st_size for f in (tmp_path / "q").glob("*.safetensors"))
    assert weights < sum(f.stat().st_size for f in directory.glob("*.safetensors")) / 2
    with pytest.raises(QuantizeError, match="already quantized"):
        llava_next.load(tmp_path / "q", progress=False, quantize="int8")
    # its own group size may be named; another one is refused, not ignored
    for quantize in ("int4", None):
        assert llava_next.load(tmp_path / "q", progress=False, quantize=quantize, group_size=32).quantization == \
            quantized.quantization
    for quantize, group_size in (("int4", 64), (None, 64), ("int4", 128), (None, 128)):  # (128: the default's value)
        with pytest.raises(QuantizeError, match=rf"group_size \(--group-size\) {group_size}: .*q is quantized already "
                                                r"\(int4, in groups of 32\); load it without a group size"):
            llava_next.load(tmp_path / "q", progress=False, quantize=quantize, group_size=group_size)
    # ... and so from the command line, where not naming one loads the checkpoint's own
    for flags, says in ((["--group-size", "128"], "group_size (--group-size) 128: "),
                        ([], "quantized: int4 (int4/g32 x ")):
        assert main(["info", "--model", str(tmp_path / "q"), *flags]) == (0 if not flags else 2)
        shown = capsys.readouterr()
        assert says in shown.out + shown.err
    with pytest.raises(QuantizeError, match="not quantized"):
        save_quantized(llava_next.load(directory, progress=False), tmp_path / "r")


def test_shapes_a_kernel_cannot_take_fall_back_to_int8_and_bad_settings_are_refused():
    model = nn.Module()
    model.language_model = nn.Module()
    model.language_model.odd = linear(in_features=96, out_features=64)  # 96 is no multiple of 64
    model.language_model.even = linear(in_features=128, out_features=64)
    model.language_model.narrow = linear(in_features=128, out_features=24)  # the CPU int4 layout needs 16s
    assert convert_linears(model, "int4", 64) == {"language_model.odd": "int8", "language_model.even": "int4/g64",
                                                  "language_model.narrow": "int8"}
    with torch.inference_mode():
        assert model.language_model.narrow(torch.randn(1, 128)).shape == (1, 24)
    with pytest.raises(QuantizeError, match="group_size must be one of"):
        convert_linears(model, "int4", 48)
    with pytest.raises(QuantizeError, match="quantize must be one of"):
        convert_linears(model, "int3")
    with pytest.raises(SystemExit) as refused:  # how to quantize is required, before anything loads
        main(["quantize", "--model", "demo", "--out", "/nonexistent/x"])
    assert refused.value.code == 2


def test_quantizing_a_slice_of_rows_at_a_time_gives_the_whole_matrix_values(monkeypatch):
    import llava_next.quantize as quantize

    weight = linear(in_features=256, out_features=70).weight.detach()
    # by hand, the whole matrix at once
    scales = weight.abs().amax(1) / 127
    q8 = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
    groups = weight.reshape(70, 256 // 64, 64)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    q4 = torch.round((groups - low) / ((high - low) / 15)).clamp(0, 15).to(torch.uint8).reshape(70, 256)
    monkeypatch.setattr(quantize, "QUANTIZE_SLICE_BYTES", 3 * 4 * 256)  # 3 rows a slice; 70 rows end mid-slice
    assert len(quantize._row_slices(weight)) == 24
    got_q8, got_scales = quantize.int8_weights(weight)
    assert torch.equal(got_q8, q8) and torch.equal(got_scales, scales)
    got_q4, scales_and_zeros = quantize.int4_weights(weight, 64)
    assert torch.equal(got_q4, q4)
    assert torch.equal(scales_and_zeros[..., 0], ((high - low) / 15)[..., 0].t())


def test_the_cpu_int4_layout_packed_a_slice_of_rows_at_a_time_is_the_whole_matrix_layout(monkeypatch):
    import llava_next.quantize as quantize

    base = linear(in_features=256, out_features=208)  # 3 blocks of 64 rows and a 16-row tail
    monkeypatch.setattr(quantize, "QUANTIZE_SLICE_BYTES", 4 * 256 * 64)  # one 64-row block a slice
    module = Int4Linear.from_linear(base, 64)
    q, _ = int4_weights(base.weight.detach(), 64)
    whole = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    assert torch.equal(module.packed, whole)


@pytest.mark.parametrize("mode, dtype", [("int8", "float32"), ("int4", "float32"), ("w8a8", "bfloat16"),
                                         ("fast", "bfloat16")])
def test_converting_while_loading_gives_the_model_converting_after_loading_does(mode, dtype, tiny, monkeypatch):
    import llava_next.engine
    from llava_next.config import read_config
    from llava_next.checkpoint import weight_files
    from llava_next.pipeline import build_model

    # (bfloat16 decoding layers loaded plain, as convert_linears leaves them, whatever this processor would choose)
    monkeypatch.setattr(llava_next.engine, "BF16_LAYOUT", "plain")
    directory = tiny("mistral")
    cfg, files, dtype = read_config(directory / "config.json"), weight_files(directory), getattr(torch, dtype)
    while_loading, plan, _ = build_model(cfg, files, dtype, torch.device("cpu"), False, convert=mode, group_size=32)
    after, _, _ = build_model(cfg, files, dtype, torch.device("cpu"), False)
    assert convert_linears(after, mode, 32) == plan and len(plan) > 0
    for name, kind in plan.items():
        assert kind.startswith(type(while_loading.get_submodule(name)).__name__[:4].lower())  # Int8Linear: int8...
    state, expected = quantized_state(while_loading), quantized_state(after)
    assert state.keys() == expected.keys()
    for name in state:
        a, b = state[name], expected[name]
        a, b = (a.to_dense(), b.to_dense()) if a.is_mkldnn else (a, b)
        assert torch.equal(a, b), name


def test_converting_while_loading_never_holds_the_float_model(tmp_path):
    """Sixteen float32 linears (128 MiB) loaded as int8 (32 MiB): each is converted as soon as it is read, so the
    load's peak stays near the int8 model plus one float linear (converting after loading peaks above 128 MiB).
    The weights go into memory the model allocated but never touched: pages count once written."""
    import subprocess
    import sys
    from safetensors.torch import save_file

    save_file({f"language_model.layer{i}.weight": torch.randn(2048, 1024) for i in range(16)},
              tmp_path / "w.safetensors")
    child = f"""
import numpy, torch  # (numpy now: torch imports it on first use, 15 MB that are not the load's)
from pathlib import Path
from torch import nn
from llava_next.checkpoint import load_weights
from llava_next.quantize import ConvertWhileLoading, convert_linears

class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.language_model = nn.Module()
        for i in range(16):
            setattr(self.language_model, f"layer{{i}}", nn.Linear(1024, 2048, bias=False))
    def checkpoint_weights(self):
        return dict(self.named_parameters())
    def skipped_checkpoint_prefixes(self):
        return ()

with torch.device("meta"):
    model = Model()
model = model.to_empty(device="cpu")
def status(field):  # KiB
    return int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1])

open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from the current size
before = status("VmRSS:")
if {{mode!r}} == "while":
    converter = ConvertWhileLoading(model, "int8")
    load_weights(model, [Path({str(tmp_path / "w.safetensors")!r})], on_loaded=converter.loaded)
    assert len(converter.finish()) == 16
else:
    load_weights(model, [Path({str(tmp_path / "w.safetensors")!r})])
    convert_linears(model, "int8")
print((status("VmHWM:") - before) / 1024)
"""
    peaks = {}
    for mode in ("while", "after"):
        run = subprocess.run([sys.executable, "-c", child.replace("{mode!r}", repr(mode))], capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        peaks[mode] = float(run.stdout.split()[-1])
    assert peaks["after"] > 128, peaks  # the float model existed whole
    assert peaks["while"] < 32 + 8 + 20, peaks  # the int8 model, one float linear, the quantizing's temporaries


@pytest.mark.parametrize("out_features", [64, 208, 16, 4096 + 48])
def test_the_cpu_int4_kernels_layout_reads_back_to_its_values(out_features):
    q = torch.randint(0, 16, (out_features, 128), dtype=torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    assert cpu_int4_layout_is_known()
    assert torch.equal(unpack_cpu_int4_transposed(packed, out_features, 128).t().to(torch.int32), q)


def test_an_int4_layer_keeps_one_copy_of_its_weights_on_the_cpu():
    base = linear(in_features=256, out_features=80)
    module = Int4Linear.from_linear(base, 64)
    q, scales_and_zeros = int4_weights(base.weight.detach(), 64)
    assert module.weight is None and module.packed.numel() == 80 * 128  # the kernel's copy only
    assert torch.equal(module.values(), q)
    assert torch.equal(quantized_state(module)["weight"], pack_nibbles(q))  # what a quantized checkpoint stores


def test_int4_dequantization_in_both_layouts_is_the_formula_written_out():
    q, scales_and_zeros = int4_weights(linear(in_features=256, out_features=80).weight.detach(), 64)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        # by hand: weight[n, k] = (q[n, k] - 8) * scale[k // 64, n] + zero[k // 64, n] from the scales in `dtype`,
        # computed in float32 and rounded to `dtype` once; the multiply and add fused (one float32 rounding) or not
        scales = scales_and_zeros[..., 0].t().repeat_interleave(64, dim=1).to(dtype).float()
        zeros = scales_and_zeros[..., 1].t().repeat_interleave(64, dim=1).to(dtype).float()
        separate = ((q.float() - 8) * scales + zeros).to(dtype)
        fused = ((q.double() - 8) * scales.double() + zeros.double()).float().to(dtype)
        stepwise = (q.to(dtype) - 8) * scales.to(dtype) + zeros.to(dtype)
        transposed = dequantize_int4_transposed(q.t().contiguous(), scales_and_zeros.to(dtype), 64, dtype)
        whole = dequantize_int4(pack_nibbles(q), scales_and_zeros.to(dtype), 64, dtype)
        # each in the memory order of its values, without a copy: (in, out) from (in, out), (out, in) from (out, in)
        assert transposed.is_contiguous() and whole.is_contiguous()
        for got in (transposed.t(), whole):
            assert got.dtype == dtype and bool(((got == separate) | (got == fused)).all())
            if dtype != torch.float32:  # rounded once: not the formula with each step rounded to `dtype`
                assert not torch.equal(got, stepwise)
    with pytest.raises(QuantizeError, match="int4 values come as uint8, not torch.int32"):
        dequantize_int4_transposed(q.t().to(torch.int32), scales_and_zeros, 64, torch.float32)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_a_prompts_matmul_a_slice_of_output_features_at_a_time_equals_the_whole_dequantized_one(kind, monkeypatch):
    import llava_next.quantize as quantize

    base = linear(in_features=256, out_features=208)  # int4: three 64-row blocks of the CPU layout and a tail
    module = Int8Linear.from_linear(base) if kind == "int8" else Int4Linear.from_linear(base, 64)
    if kind == "int8":
        weight = module.weight.float() * module.scales.float()[:, None]
    else:
        weight = dequantize_int4(pack_nibbles(module.values()), module.scales_and_zeros, 64, torch.float32)
    x = torch.randn(INT4_KERNEL_ROWS + 9, 256)  # the prompt path of both
    with torch.inference_mode():
        expected = F.linear(x, weight, base.bias)
        monkeypatch.setattr(quantize, "PROMPT_SLICE_BYTES", 256 * 4 * 50)  # 50 features a slice (int4: 64)
        assert relative_error(module(x), expected) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_int8_layer_in_column_blocks_gives_the_plain_layers_values(dtype, monkeypatch):
    import llava_next.quantize as quantize

    base = linear(in_features=256, out_features=208, dtype=dtype)  # 13 blocks of 16 columns
    plain, blocked = Int8Linear.from_linear(base), Int8Linear.from_linear(base)
    blocked.block_columns()
    assert blocked.blocked and blocked.weight.shape == (13, 256, 16)
    assert torch.equal(blocked.weight[2, :, 3], plain.weight[2 * 16 + 3])  # block b, column c: output 16 b + c
    assert torch.equal(blocked.values(), plain.weight)
    assert torch.equal(blocked.values(slice(5, 37)), plain.weight[5:37])  # rows across block boundaries
    assert torch.equal(blocked.dequantized(dtype, slice(16, 48)), plain.dequantized(dtype, slice(16, 48)))
    assert torch.equal(quantized_state(blocked)["weight"], plain.weight)  # saved as the plain layout
    for first, last in ((0, 208), (16, 48), (5, 37), (192, 208)):  # whole blocks, rows across blocks, the last block
        assert torch.equal(blocked.dequantized_t(dtype, first, last), plain.dequantized_t(dtype, first, last))
        assert torch.equal(plain.dequantized_t(dtype, first, last), plain.dequantized(dtype, slice(first, last)).t())
    # eagerly: dequantized 32 output features at a time (seven slices, the last short), whatever the rows
    monkeypatch.setattr(quantize, "PROMPT_SLICE_BYTES", 256 * dtype.itemsize * 40)
    expected_weight = plain.weight.float() * plain.scales.float()[:, None]
    with torch.inference_mode():
        for rows in (1, BLOCKED_ROWS + 1, INT8_KERNEL_ROWS + 1):
            x = torch.randn(rows, 256).to(dtype)
            expected = F.linear(x.float(), expected_weight, base.bias.float())
            assert relative_error(blocked(x), expected) < (1e-5 if dtype == torch.float32 else 1e-2)
            if rows > INT8_KERNEL_ROWS:  # the plain layer's prompt path too: the same slices
                assert relative_error(blocked(x), plain(x)) < (1e-6 if dtype == torch.float32 else 1e-2)
    blocked.unblock_columns()
    assert not blocked.blocked and torch.equal(blocked.weight, plain.weight)


@pytest.mark.parametrize("kind", [Int8Linear, W8A8Linear])
def test_int8_layers_of_widths_pytorchs_kernel_gets_wrong_give_the_dequantized_values(kind):
    # PyTorch's CPU kernel gives wrong numbers at these widths, or crashes the process (as at 20)
    for in_features in (24, 40):
        base = linear(in_features=in_features, out_features=33, dtype=torch.bfloat16)
        module = kind.from_linear(base)
        weight = module.weight.float() * module.scales.float()[:, None]
        with torch.inference_mode():
            for rows in (1, 3, DECODE_ROWS + 1):
                x = torch.randn(rows, in_features).bfloat16()
                expected = F.linear(x.float(), weight, base.bias.float())
                assert relative_error(module(x), expected) < 0.03, (in_features, rows)


def test_the_layers_a_decoding_step_runs_are_the_ones_laid_out_in_column_blocks(monkeypatch):
    import llava_next.quantize

    # each replaced weight is handed back to the system as it goes: under the engine's allocator settings the freed
    # ones otherwise stayed with the process (74 MiB of the medium preset's 303 MiB int8 model, BENCHMARKS.md)
    handed_back = []
    monkeypatch.setattr(llava_next.quantize, "release_free_memory", lambda: handed_back.append(1))
    model = nn.Module()  # a LlavaModel's parts, by name
    model.language_model, model.lm_head = nn.Module(), Int8Linear.from_linear(linear(out_features=64))
    model.language_model.proj = Int8Linear.from_linear(linear(out_features=32))
    model.language_model.odd = Int8Linear.from_linear(linear(out_features=40))  # not whole blocks: stays plain
    model.language_model.w8a8 = W8A8Linear.from_linear(linear(out_features=32))  # _int_mm's plain layout
    model.vision_tower = Int8Linear.from_linear(linear(out_features=32))  # prompts only
    assert block_int8_columns(model) == 2 and len(handed_back) == 2
    assert model.lm_head.blocked and model.language_model.proj.blocked
    assert not any(m.blocked for m in (model.language_model.odd, model.language_model.w8a8, model.vision_tower))
    assert block_int8_columns(model, blocked=False) == 2 and not model.lm_head.blocked and len(handed_back) == 4


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_cuda_int8_steps_read_the_int8_weights_without_a_16_bit_copy():
    # CUDA's compiled decoding multiplies few rows as a sum over blocks of one output (Int8Linear.forward); its CPU
    # twin: the same form through inductor, whose fusion decisions do not depend on the device. The form CUDA took
    # before, F.linear on the weights made 16-bit, is compiled too: its copy of the weights is what is looked for.
    from torch._inductor.utils import run_and_get_code

    from llava_next.quantize import CUDA_SUMMED_ROWS, copied_int8_matmul, summed_int8_matmul

    layer = Int8Linear.from_linear(linear(256, 96, dtype=torch.bfloat16))
    norm = nn.RMSNorm(256).to(torch.bfloat16)  # a producer of the rows, as in a decoder

    def summed(x):
        return summed_int8_matmul(norm(x), layer.weight, layer.scales)

    def made_16_bit(x):
        return copied_int8_matmul(norm(x), layer.weight, layer.scales)

    def buffer_sizes(code: str) -> list[int]:
        shapes = re.findall(r"empty_strided_cpu\(\(([0-9, ]*)\)", code)
        return [math.prod(int(n) for n in shape.split(",") if n.strip()) for shape in shapes]

    with torch.inference_mode():
        for rows in range(1, CUDA_SUMMED_ROWS + 1):
            x = torch.randn(rows, 256).bfloat16()
            torch._dynamo.reset()
            got, code = run_and_get_code(torch.compile(summed), x)
            want = F.linear(norm(x).float(), layer.dequantized(torch.float32))
            assert got.dtype == torch.bfloat16 and relative_error(got, want) < 1e-2
            sizes = buffer_sizes("\n".join(code))
            assert sizes and max(sizes) <= rows * 256, rows
            torch._dynamo.reset()
            _, code = run_and_get_code(torch.compile(made_16_bit), x)
            assert 96 * 256 in buffer_sizes("\n".join(code))  # the copy, found where it is made


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile on a CPU needs a C++ compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_compiled_step_multiplies_column_blocks_as_pytorchs_int8_kernel_does(dtype, monkeypatch):
    import llava_next.quantize as quantize

    traced = []

    def blocked_int8_matmul(*args):
        traced.append(args[0].shape)  # while tracing: the form is part of the graph
        return quantize_blocked(*args)

    quantize_blocked = quantize.blocked_int8_matmul
    monkeypatch.setattr(quantize, "blocked_int8_matmul", blocked_int8_matmul)
    # Two layers, the second as wide in as out, its rows an intermediate of the graph (which an output aliasing its
    # input, or a buffer reused too early, would overwrite while the matmul reads it)
    plain = [Int8Linear.from_linear(linear(256, 208, dtype=dtype)),
             Int8Linear.from_linear(linear(208, 208, seed=1, dtype=dtype))]
    blocked = [Int8Linear.from_linear(linear(256, 208, dtype=dtype)),
               Int8Linear.from_linear(linear(208, 208, seed=1, dtype=dtype))]
    for layer in blocked:
        layer.block_columns()
    norm = nn.RMSNorm(256).to(dtype)  # a producer of the rows, which inductor would fuse into the matmul's loop
    torch._dynamo.reset()  # (the lambda's code is the same in every parametrization: a fresh cache for each)
    step = torch.compile(lambda x: blocked[1](torch.relu(blocked[0](norm(x)))), dynamic=True)
    with torch.inference_mode():
        for rows in (1, 2, BLOCKED_ROWS, BLOCKED_ROWS + 1):
            x = torch.randn(rows, 256).to(dtype)
            traced_before = len(traced)
            got, want = step(x), plain[1](torch.relu(plain[0](norm(x))))
            assert got.dtype == dtype and got.shape == (rows, 208)
            assert relative_error(got, want) < (1e-6 if dtype == torch.float32 else 2e-2), rows
            if rows == 1:
                assert len(traced) == 2  # the column-blocked form compiled in, for both layers
            if rows > BLOCKED_ROWS:  # beyond its rows the graph compiled for them does not use it
                assert len(traced) == traced_before, rows


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="torch.compile on a CPU needs a C++ compiler")
def test_a_compiled_w8a8_step_multiplies_int8_rows_as_the_eager_layer_does():
    # w8a8's decoding steps quantize their rows and multiply them with _int_mm, compiled as eagerly: the rows' scales
    # and rounding fused by inductor, rounded as eager rounds them, give the same integers and the same floats
    from torch._inductor.utils import run_and_get_code

    layers = [W8A8Linear.from_linear(linear(256, 208, dtype=torch.bfloat16)),
              W8A8Linear.from_linear(linear(208, 208, seed=1, dtype=torch.bfloat16))]
    norm = nn.RMSNorm(256).to(torch.bfloat16)

    def step(x):
        return layers[1](torch.relu(layers[0](norm(x))))

    torch._dynamo.reset()
    compiled = torch.compile(step, dynamic=True, options={"emulate_precision_casts": True})
    with torch.inference_mode():
        for rows in (1, 2, DECODE_ROWS + 1):
            x = torch.randn(rows, 256).bfloat16()
            got, code = run_and_get_code(compiled, x)
            assert torch.equal(got, step(x)), rows
            if rows == 1:
                assert "_int_mm" in "\n".join(code)
