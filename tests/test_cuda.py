"""The CUDA paths: run only where a GPU is (skipped elsewhere; CI has none). Their CPU twins are tested in
test_quantize.py, test_speed.py (static decoding) and test_scheduler.py; these check the same things on the device.

    python -m pytest tests/test_cuda.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import llava_next
from conftest import smooth_image
from llava_next.quantize import Int4Linear, Int8Linear, W8A8Linear, dequantize_int4

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def relative_error(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


PROMPTS = [chat("Describe it."), chat("What colour is the large shape in the middle of this picture?")]
IMAGES = [[smooth_image(300, 200)], [smooth_image(120, 260)]]


@pytest.mark.parametrize("family", ["vicuna", "mistral"])
def test_float32_on_cuda_gives_the_cpu_tokens(tiny, family):
    cpu = llava_next.load(tiny(family), dtype="float32", device="cpu", progress=False)
    gpu = llava_next.load(tiny(family), dtype="float32", device="cuda", progress=False)
    torch.backends.cuda.matmul.allow_tf32 = False
    want = [g.token_ids for g in cpu.generate(PROMPTS, IMAGES, max_new_tokens=8)]
    assert [g.token_ids for g in gpu.generate(PROMPTS, IMAGES, max_new_tokens=8)] == want


@pytest.mark.parametrize("rows", [1, 4, 12, 40])  # decoding kernels, CUDA's _int_mm limit (> 16), prompts
def test_quantized_linears_on_cuda_equal_their_dequantized_weights(rows):
    torch.manual_seed(0)
    base = nn.Linear(512, 256).to(torch.bfloat16).cuda()
    x = torch.randn(rows, 512, dtype=torch.bfloat16, device="cuda")
    with torch.inference_mode():
        int8 = Int8Linear.from_linear(base)
        expected = F.linear(x.float(), int8.dequantized(torch.float32), base.bias.float())
        assert relative_error(int8(x), expected) < 1e-2
        for group_size in (32, 128):
            int4 = Int4Linear.from_linear(base, group_size)
            w = dequantize_int4(int4.weight, int4.scales_and_zeros, group_size, torch.float32)
            assert relative_error(int4(x), F.linear(x.float(), w, base.bias.float())) < 2e-2
        w8a8 = W8A8Linear.from_linear(base)
        assert relative_error(w8a8(x), base(x)) < 0.05


def test_a_compiled_cuda_int8_layer_sums_over_its_int8_weights_up_to_its_rows():
    # Int8Linear.forward's compiled CUDA route (quantize.CUDA_SUMMED_ROWS): right values, and no (out, in) 16-bit
    # copy of the weights in the generated code up to that many rows; beyond, the copy (F.linear) as before
    import re

    from torch._inductor.utils import run_and_get_code

    from llava_next.quantize import CUDA_SUMMED_ROWS

    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(512, 256).to(torch.bfloat16).cuda())
    with torch.inference_mode():
        for rows in (1, CUDA_SUMMED_ROWS, CUDA_SUMMED_ROWS + 1):
            x = torch.randn(rows, 512, dtype=torch.bfloat16, device="cuda")
            torch._dynamo.reset()
            got, code = run_and_get_code(torch.compile(layer), x)
            expected = F.linear(x.float(), layer.dequantized(torch.float32), layer.bias.float())
            assert relative_error(got, expected) < 1e-2, rows
            copies = re.findall(r"empty_strided_cuda\(\(256, 512\)", "\n".join(code))
            assert bool(copies) == (rows > CUDA_SUMMED_ROWS), rows


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_compiled_cuda_graph_decoding_gives_the_eager_tokens(tiny, quantize):
    # float32 so that eager and compiled agree to the token; twice, so the second request replays in the KV space
    # the first left (reused, zeroed) and a batch of two rows at different lengths
    dtype = "float32" if quantize is None else "bfloat16"
    eager = llava_next.load(tiny("mistral"), dtype=dtype, device="cuda", progress=False, quantize=quantize)
    compiled = llava_next.load(tiny("mistral"), dtype=dtype, device="cuda", progress=False, quantize=quantize,
                               compile=True)
    assert compiled.engine.static_decode
    for _ in range(2):
        want = [g.token_ids for g in eager.generate(PROMPTS, IMAGES, max_new_tokens=12)]
        got = [g.token_ids for g in compiled.generate(PROMPTS, IMAGES, max_new_tokens=12)]
        if quantize is None:
            assert got == want
        else:  # bfloat16 sums in another order: the first tokens agree
            assert [g[:3] for g in got] == [w[:3] for w in want]
    assert compiled.engine.decode_step is not compiled.model  # it ran compiled, no eager fallback


def test_eager_cuda_decoding_runs_no_cudnn_attention(tiny):
    # cuDNN's attention builds a plan for every new key length: prompts and eager decoding steps run on flash
    # attention (engine.VARYING_LENGTH_BACKENDS). PyTorch prefers cuDNN only on some GPUs and builds, so cuDNN is put
    # first here, and a bare attention of the same shapes shows that it then runs. A text-only prompt: the vision
    # tower keeps PyTorch's choice.
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    def attention_kernels(run) -> set[str]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        return {e.key for e in prof.key_averages()
                if "scaled_dot_product" in e.key and e.key != "aten::scaled_dot_product_attention"}

    pipe = llava_next.load(tiny("mistral"), dtype="bfloat16", device="cuda", progress=False)
    pipe.engine.eos_token_ids = []
    text_only = [{"role": "user", "content": [{"type": "text", "text": "Describe a red square."}]}]
    cudnn_first = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                   SDPBackend.MATH]
    text = pipe.config.text
    q = torch.randn(1, text.num_heads, 40, text.head_dim, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(1, text.num_heads, 40, text.head_dim, dtype=torch.bfloat16, device="cuda")
    with sdpa_kernel(cudnn_first, set_priority=True):
        bare = attention_kernels(lambda: F.scaled_dot_product_attention(q, k, k, is_causal=True))
        if not any("cudnn" in name for name in bare):
            pytest.skip(f"cuDNN's attention does not run on this GPU or build ({bare})")
        pipe.generate(text_only, max_new_tokens=2)
        ours = attention_kernels(lambda: pipe.generate(text_only, max_new_tokens=6))
    assert ours and not any("cudnn" in name for name in ours), ours
