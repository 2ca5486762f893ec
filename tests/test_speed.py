"""The fast paths compute what the plain ones do: fused projections, unmasked attention, the truncated vision
tower, reading weights straight into parameters, and the dtype that `auto` picks."""

from __future__ import annotations

import datetime
import functools
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

import llava_next
from conftest import smooth_image
from llava_next.checkpoint import CheckpointError, read_safetensors_index
from llava_next.config import read_config
from llava_next.memory import libc
from llava_next.pipeline import cpu_has_native_bf16, resolve_dtype
from llava_next.quantize import BLOCK_COLUMNS, FastLinear, Int8Linear, W8A8Linear, can_pack


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


@pytest.mark.parametrize("name", ["vicuna", "qwen2", "mistral_window", "llava15"])
def test_the_inference_model_gives_the_plain_models_logits(name, tiny):
    lean = llava_next.load(tiny(name), dtype="float32", progress=False)
    plain = llava_next.load(tiny(name), dtype="float32", progress=False, trainable=True)
    assert lean.model.language_model.layers[0].self_attn.fused and not plain.model.language_model.layers[0].self_attn.fused
    assert len(lean.model.vision_tower.encoder.layers) < plain.model.vision_tower.cfg.num_layers
    assert not hasattr(lean.model.vision_tower, "post_layernorm")
    inputs, _ = lean.prepare(chat("Describe it."), [smooth_image(500, 316)])
    with torch.no_grad():
        assert relative_error(lean.model(**inputs), plain.model(**inputs)) < 1e-5
    assert lean.generate(chat("Describe it."), [smooth_image(500, 316)], max_new_tokens=8).token_ids == \
        plain.generate(chat("Describe it."), [smooth_image(500, 316)], max_new_tokens=8).token_ids
    # every checkpoint weight is reachable under its own name, fused or not
    lean_weights, plain_weights = lean.model.checkpoint_weights(), plain.model.checkpoint_weights()
    for key, value in lean_weights.items():
        assert torch.equal(value, plain_weights[key]), key


def test_unmasked_attention_equals_the_masked_computation(tiny, load_pipeline):
    pipe = load_pipeline(tiny("vicuna"))
    inputs, _ = pipe.prepare(chat("Describe it."), [smooth_image(300, 200)])
    embeds = pipe.model.embed(inputs["input_ids"], pipe.model.image_features(inputs["pixel_values"], inputs["image_sizes"]))
    positions = torch.arange(embeds.shape[1])[None]
    with torch.no_grad():
        unmasked = pipe.model.language_model(embeds, positions, None)
        masked = pipe.model.language_model(embeds, positions, torch.ones_like(inputs["input_ids"], dtype=torch.bool))
    assert relative_error(unmasked, masked) < 1e-5


@pytest.mark.parametrize("name", ["vicuna", "mistral_window"])
@pytest.mark.parametrize("keep", [1, 3])
def test_the_last_positions_alone_give_the_whole_sequences_last_logits(name, keep, tiny, load_pipeline):
    # the last layer computes its attention output and MLP at the kept positions only: unpadded (causal kernels),
    # padded rows (masks), a sliding window smaller than the prompt, and a prompt continued in a cache (start > 0)
    from llava_next.model.decoder import KVCache

    pipe = load_pipeline(tiny(name))
    model = pipe.model
    window = model.cfg.text.layer_window(0)
    inputs, _ = pipe.prepare([chat("Describe it."), chat("What colour is the large shape in the middle?")],
                             [[smooth_image(300, 200)], [smooth_image(120, 260)]])
    single, _ = pipe.prepare(chat("Describe it."), [smooth_image(300, 200)])
    assert window is None or window < single["input_ids"].shape[1]  # the window really cuts the prompt
    seen = []  # the rows the last layer's MLP computes
    hook = model.language_model.layers[-1].mlp.register_forward_hook(
        lambda module, args, out: seen.append(args[0].shape[1]))
    try:
        with torch.no_grad():
            for batch in (single, inputs):
                whole = model(**batch)[:, -keep:]
                last = model(**batch, logits_to_keep=keep)
                assert last.shape == whole.shape
                assert relative_error(last, whole) < 1e-5
                assert seen[-2:] == [batch["input_ids"].shape[1], keep]  # all positions, then only the kept ones
            # a prompt in two chunks through a cache: the second chunk's last positions
            text = model.cfg.text
            ids, total = single["input_ids"], single["input_ids"].shape[1]
            features = [model.image_features(single["pixel_values"], single["image_sizes"])[0]]
            shape = (text.num_layers, 1, text.num_kv_heads, total, text.head_dim)
            cache = KVCache(torch.zeros(shape), torch.zeros(shape))
            split = total - 40  # the image's placeholders run on into the second chunk
            first = int((ids[0, :split] == model.cfg.image_token_id).sum())
            rest = [features[0][first:]]
            model(ids[:, :split], image_features=[features[0][:first]], cache=cache, start=0,
                  positions=torch.arange(split)[None])
            positions = torch.arange(split, total)[None]
            whole = model(ids[:, split:], image_features=rest, cache=cache, start=split, positions=positions)[:, -keep:]
            last = model(ids[:, split:], image_features=rest, cache=cache, start=split, positions=positions,
                         logits_to_keep=keep)
            assert relative_error(last, whole) < 1e-5
            assert relative_error(last, model(**single)[:, -keep:]) < 1e-4
    finally:
        hook.remove()


def test_auto_dtype_follows_the_checkpoint_and_the_processor(tiny):
    cfg = read_config(tiny("vicuna") / "config.json")
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    with_bf16, without = {"avx2", "avx512f", "avx512_bf16"}, {"avx2", "avx512f"}
    assert cpu_has_native_bf16(with_bf16) and cpu_has_native_bf16({"amx_bf16"}) and not cpu_has_native_bf16(without)
    cfg.torch_dtype = "bfloat16"
    assert resolve_dtype("auto", cpu, cfg, with_bf16)[0] == torch.bfloat16
    assert resolve_dtype(None, cpu, cfg, without)[0] == torch.float32
    assert resolve_dtype("auto", gpu, cfg, without)[0] == torch.bfloat16
    cfg.torch_dtype = "float16"
    assert resolve_dtype("auto", gpu, cfg)[0] == torch.float16
    assert resolve_dtype("auto", cpu, cfg, with_bf16)[0] == torch.bfloat16
    cfg.torch_dtype = "float32"
    dtype, reason = resolve_dtype("auto", cpu, cfg, with_bf16)
    assert dtype == torch.float32 and "float32" in reason
    assert resolve_dtype("auto", gpu, cfg)[0] == torch.bfloat16
    assert resolve_dtype("float16", cpu, cfg) == (torch.float16, "asked for")
    with pytest.raises(ValueError, match="dtype 'fp8' is not one of auto"):
        resolve_dtype("fp8", cpu, cfg)


def test_a_16_bit_checkpoint_loads_in_its_auto_dtype_and_says_why(tiny, tmp_path):
    target = tmp_path / "bf16"
    shutil.copytree(tiny("vicuna"), target)
    half = llava_next.load(tiny("vicuna"), dtype="bfloat16", progress=False, trainable=True)
    half.save(target, dtype=torch.bfloat16)
    pipe = llava_next.load(target, progress=False)
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert pipe.model.lm_head.weight.dtype == expected
    assert pipe.dtype_reason.startswith("auto") and pipe.load_seconds > 0


@pytest.mark.parametrize("value, dtype", [("nan", torch.float32), ("inf", torch.bfloat16), ("-inf", torch.float16)])
def test_weights_that_are_not_finite_are_refused_at_load(value, dtype, tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    target = tmp_path / "nan"
    shutil.copytree(tiny("vicuna"), target)
    state = {k: v.to(dtype) if v.is_floating_point() else v
             for k, v in load_file(str(target / "model.safetensors")).items()}
    key = next(k for k in state if "layers.1.mlp.down_proj" in k)
    state[key][3, 4] = float(value)
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="NaN or infinite values in .*down_proj"):
        llava_next.load(target, progress=False)


def test_truncated_and_fake_safetensors_files_are_clear_errors(tiny, tmp_path):
    target = tmp_path / "cut"
    shutil.copytree(tiny("vicuna"), target)
    weights = target / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        llava_next.load(target, progress=False)
    weights.write_text(json.dumps({"not": "weights"}))
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        llava_next.load(target, progress=False)
    weights.write_bytes(b"")
    with pytest.raises(CheckpointError, match="too short to be a safetensors file"):
        read_safetensors_index(weights)


def test_weights_are_read_straight_into_the_parameters(tiny):
    from safetensors.torch import load_file

    directory = tiny("vicuna")
    stored = {t.name: t for t in read_safetensors_index(directory / "model.safetensors")}
    reference = load_file(str(directory / "model.safetensors"))
    assert stored.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(stored[name].read(), tensor), name
        into = torch.empty(tensor.shape, dtype=torch.bfloat16)  # another dtype: through one temporary
        stored[name].read_into(into)
        assert torch.equal(into, tensor.to(torch.bfloat16)), name


@pytest.mark.parametrize("float32_kernel", ["onednn", "pytorch"])
def test_compiled_decoding_gives_the_eager_tokens(tiny, float32_kernel, monkeypatch):
    # (each of the kernels a processor's measurement may choose for float32 linears: oneDNN's is an operator the
    # compiler keeps opaque, PyTorch's F.linear one it traces)
    monkeypatch.setattr(llava_next.engine, "FLOAT32_KERNEL", float32_kernel)
    eager = llava_next.load(tiny("vicuna"), dtype="float32", progress=False, prefix_cache=False)
    compiled = llava_next.load(tiny("vicuna"), dtype="float32", progress=False, prefix_cache=False, compile=True)
    assert eager.engine.float32_kernel == compiled.engine.float32_kernel == float32_kernel
    got = compiled.generate(chat("Describe it."), [smooth_image(300, 200)], max_new_tokens=6)
    assert got.token_ids == eager.generate(chat("Describe it."), [smooth_image(300, 200)], max_new_tokens=6).token_ids
    if shutil.which("g++") or shutil.which("c++"):  # with a compiler it really ran compiled, no fallback
        assert compiled.engine.decode_step is not compiled.model


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile on a CPU needs a C++ compiler")
def test_a_process_compiles_more_pipelines_than_pytorchs_recompile_limit(tiny):
    # Every pipeline's graphs are entries of one function (LlavaModel.forward); past PyTorch's recompile_limit a
    # new pipeline whose step needs a graph of its own (another dtype here) would decode eagerly. With the limit at
    # 1 here, the second pipeline still compiles its own.
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(recompile_limit=1):  # (restored afterwards, whatever the engine set)
        for dtype in ("float32", "bfloat16"):
            pipe = llava_next.load(tiny("vicuna"), dtype=dtype, progress=False, prefix_cache=False, compile=True)
            pipe.generate(chat("Describe it."), [smooth_image(300, 200)], max_new_tokens=3)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile on a CPU needs a C++ compiler")
@pytest.mark.parametrize("quantize, int8_layout", [(None, "blocks"), (None, "plain"), ("int8", "blocks"), ("int8", "plain"),
                                                   ("int4", "blocks"), ("w8a8", "blocks")])
def test_compiled_16_bit_cpu_decoding_is_one_graph_that_writes_the_cache_in_place(tiny, quantize, int8_layout,
                                                                                   monkeypatch):
    # bfloat16 on the CPU (oneDNN's linears on blocked weights, int8, int4): attention over a cache slice growing by
    # one key a step, the KV write as an opaque op. 70 steps cross a key block's end and reach the space's last
    # block, all on the graph compiled at the first. int8 layers in either layout a compiled engine may choose.
    from llava_next.model.decoder import KEY_BLOCK, KVCache

    monkeypatch.setattr(llava_next.engine, "INT8_LAYOUT", int8_layout)
    # (bfloat16's decoding layers likewise: oneDNN's blocked layout, or plain weights through torch.mv)
    monkeypatch.setattr(llava_next.engine, "BF16_LAYOUT", "plain" if int8_layout == "plain" else "blocked")
    pipe = llava_next.load(tiny("mistral"), dtype="bfloat16", quantize=quantize, progress=False, prefix_cache=False,
                           compile=True)
    model, engine = pipe.model, pipe.engine
    inputs, _ = pipe.prepare(chat("Describe it."), [smooth_image(300, 200)])
    length, steps = inputs["input_ids"].shape[1], 70
    compiled_cache = engine.kv_space(1, length + steps)  # rounded past a whole block (one layout for every step)
    assert compiled_cache.capacity % KEY_BLOCK == 1 and compiled_cache.capacity > length + steps
    eager_cache = KVCache.allocate(model.cfg.text, 1, length + steps, torch.bfloat16, "cpu")
    blocked_int8 = any(isinstance(m, Int8Linear) and m.blocked for m in model.modules())
    torch._dynamo.utils.counters.clear()
    with torch.inference_mode():
        for cache in (compiled_cache, eager_cache):
            token = model(**inputs, cache=cache, logits_to_keep=1)[:, -1].argmax(-1, keepdim=True)
        for step in range(steps):
            position = length + step
            at = dict(start=position, positions=torch.tensor([[position]]), logits_to_keep=1)
            got = engine.decode(token, cache=compiled_cache, **at)
            want = model(token, cache=eager_cache, **at)
            # fused arithmetic rounded as eager rounds it: the same floats. int8 layers excepted (int4's fallbacks
            # too): a compiled step multiplies their column blocks exactly (float32 sums of int8 x bfloat16
            # products, then the scales), an eager step on them the weights dequantized to bfloat16 (each rounded)
            same = torch.equal if not blocked_int8 else functools.partial(torch.allclose, rtol=2e-2, atol=4e-3)
            assert same(got, want), step
            # written in place, in the caller's cache: the next step reads this token's keys
            assert same(compiled_cache.keys[:, :, :, position], eager_cache.keys[:, :, :, position]), step
            token = want[:, -1].argmax(-1, keepdim=True)
    assert engine.decode_step is not model
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    # the decoder's int8 layers (int4's fallbacks too) in column blocks; the tiny vocabulary, not a multiple of 16,
    # keeps the lm_head plain; w8a8's layers stay plain for _int_mm, even where the blocks are asked for
    int8_layers = [m for m in model.language_model.modules() if type(m) is Int8Linear]
    w8a8_layers = [m for m in model.language_model.modules() if isinstance(m, W8A8Linear)]
    assert (quantize == "w8a8") == bool(w8a8_layers) and not any(m.blocked for m in w8a8_layers)
    assert all(m.blocked == (int8_layout == "blocks" and m.out_features % BLOCK_COLUMNS == 0) for m in int8_layers)
    assert engine.int8_blocks == (int8_layout == "blocks" and bool(int8_layers)) and engine.int8_layout_seconds == {}
    assert not any(isinstance(m, Int8Linear) and m.blocked
                   for m in [*model.vision_tower.modules(), *model.multi_modal_projector.modules(), model.lm_head])
    if quantize == "int8" and int8_layout == "blocks":
        assert sum(m.blocked for m in int8_layers) == len(int8_layers) > 0
    if quantize is None:  # compiled with FastLinear, whose matmul is an opaque operator under compile, not nn.Linear
        packable = can_pack(torch.empty(0, dtype=torch.bfloat16))
        assert isinstance(model.lm_head, FastLinear) and model.lm_head.packed == (int8_layout == "blocks" and packable)
        assert engine.bf16_layout == (("blocked" if int8_layout == "blocks" else "plain") if packable else None)


def test_int8_weights_leave_the_column_blocks_for_a_server_and_for_eager_decoding(tiny, monkeypatch):
    # Compiled CPU steps of one row multiply int8 weights in column blocks (where they are the faster layout); a
    # server's steps carry many rows, which PyTorch's kernels multiply in one pass over the weights; eager decoding
    # (the compile failed) runs them. The tokens are the plain eager pipeline's throughout.
    from llava_next.engine import BackgroundEngine

    monkeypatch.setattr(llava_next.engine, "INT8_LAYOUT", "blocks")
    expected = llava_next.load(tiny("mistral"), dtype="bfloat16", quantize="int8", progress=False,
                               prefix_cache=False).generate(chat("Describe it."), [smooth_image(300, 200)],
                                                            max_new_tokens=5).token_ids

    def compiled_int8():
        pipe = llava_next.load(tiny("mistral"), dtype="bfloat16", quantize="int8", progress=False,
                               prefix_cache=False, compile=True)
        # the decoder's layers; not the lm_head (a tiny vocabulary, not a multiple of 16)
        layers = [m for m in pipe.model.language_model.modules() if isinstance(m, Int8Linear)]
        assert layers and all(m.blocked for m in layers)
        assert pipe.engine.int8_layout_reason == "set by LLAVA_NEXT_INT8_LAYOUT=blocks"
        return pipe, layers

    def answer(pipe):
        return pipe.generate(chat("Describe it."), [smooth_image(300, 200)], max_new_tokens=5).token_ids

    pipe, layers = compiled_int8()
    assert answer(pipe) == expected
    server = BackgroundEngine(pipe.engine, slots=4, capacity=512)
    server.shutdown()
    assert not any(m.blocked for m in layers) and pipe.engine.int8_layout_reason == "plain for steps of many rows"
    assert answer(pipe) == expected  # the step compiled for the blocks, compiled again for the plain layout
    if shutil.which("g++") or shutil.which("c++"):
        assert pipe.engine.decode_step is not pipe.model

    pipe, layers = compiled_int8()

    def compile_failed(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    pipe.engine.decode_step = compile_failed
    with pytest.warns(UserWarning, match="decoding eagerly instead"):
        got = answer(pipe)
    assert not any(m.blocked for m in layers) and got == expected
    assert pipe.engine.int8_layout_reason == "plain: decoding eagerly"


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile on a CPU needs a C++ compiler")
def test_a_compiling_server_compiles_every_form_of_its_decoding_step_before_it_is_ready(tiny, monkeypatch):
    # A compiled step is compiled for one row, for rows at one length and for rows at different lengths (masked
    # keys), each when first met: 7-27 s each on the medium preset, which a server's first users would wait for.
    # The server meets them all before it says it is ready, and nothing of it shows in the caches or their counts.
    pytest.importorskip("fastapi")
    from torch._dynamo.utils import counters

    from llava_next.engine import BackgroundEngine, Sequence
    from llava_next.prompt import IncrementalDetokenizer
    from llava_next.sampling_params import SamplingParams
    from llava_next.serve.app import ServeSettings, ServerState

    def graphs_compiled_while_serving(warm_up: bool) -> int:
        # (the graphs compiled so far in this process, by other tests or by the other server here, are forgotten:
        # a new model's step would take them)
        torch._dynamo.reset()
        if not warm_up:
            monkeypatch.setattr(BackgroundEngine, "warm_up", lambda self: 0.0)
        state = ServerState(ServeSettings(model=str(tiny("mistral")), dtype="float32", compile=True,
                                          max_concurrent=4, kv_memory=2**24))
        state.load()
        try:
            assert state.failure is None and state.engine.steps > (0 if warm_up else -1)
            assert state.pipe.engine.decode_step is not state.pipe.model  # (compiled: no eager fallback)
            assert state.engine.scheduler.eos == frozenset(state.pipe.engine.eos_token_ids)  # (restored)
            assert state.pipe.cache_stats() == state.pipe.engine.cache_stats()
            assert all(state.pipe.cache_stats()[cache][kind] == 0 for cache in ("image_features", "prefix")
                       for kind in ("hits", "misses", "entries"))
            tokenizer = state.pipe.processor.tokenizer
            before = counters["stats"]["unique_graphs"]
            for lengths in ((3,), (3, 40), (5, 5), (150, 2), (7, 9, 11)):  # (the last: three rows, other widths)
                seqs = [Sequence([9] * n, SamplingParams(max_new_tokens=8), IncrementalDetokenizer(tokenizer))
                        for n in lengths]
                state.engine.submit(seqs)
                while not all(seq.done for seq in seqs):
                    time.sleep(0.01)
                assert all(seq.error is None for seq in seqs)
            return counters["stats"]["unique_graphs"] - before
        finally:
            state.engine.shutdown()

    assert graphs_compiled_while_serving(warm_up=False) > 0  # (what a warm-up spares the first requests)
    monkeypatch.undo()
    assert graphs_compiled_while_serving(warm_up=True) == 0


@pytest.mark.parametrize("max_concurrent, blocked", [(4, False), (1, True)])
def test_a_compiling_server_lays_int8_weights_out_for_the_rows_its_steps_will_carry(tiny, monkeypatch, max_concurrent,
                                                                                    blocked):
    # A server loads its model eagerly, then compiles the decoding step knowing its slots: with several, a CPU
    # engine's int8 weights stay plain (PyTorch's kernel reads them once for all rows), never timed or laid out in
    # column blocks first and straight back when the scheduler starts; with one, as generate() compiles them
    pytest.importorskip("fastapi")
    from llava_next.serve.app import ServeSettings, ServerState

    monkeypatch.setattr(llava_next.engine, "INT8_LAYOUT", "remeasure")  # (timed at every load: fake timings)
    timed, laid_out = [], []
    monkeypatch.setattr(llava_next.engine, "time_int8_layouts",
                        lambda model: (timed.append(1), {"column blocks": 1.0, "plain": 2.0})[1])
    monkeypatch.setattr(llava_next.engine, "block_int8_columns",
                        lambda model, blocked, real=llava_next.engine.block_int8_columns: (
                            laid_out.append(blocked), real(model, blocked=blocked))[1])
    state = ServerState(ServeSettings(model=str(tiny("mistral")), dtype="bfloat16", quantize="int8", compile=True,
                                      max_concurrent=max_concurrent, kv_memory=2**26))
    state.load()
    try:
        assert state.failure is None and state.pipe.engine.decode_step is not state.pipe.model
        layers = [m for m in state.pipe.model.language_model.modules() if isinstance(m, Int8Linear)]
        assert layers and all(m.blocked == blocked for m in layers)
        # (with many rows the plain layers are only told to stay plain, when compiled and when the scheduler starts)
        assert laid_out == ([True] if blocked else [False, False]) and len(timed) == int(blocked)
        reason = state.pipe.engine.int8_layout_reason
        assert reason.startswith("measured") if blocked else reason == "plain for steps of many rows"
        # compiling again does nothing: no second graph entry, nothing timed or laid out again
        step, before = state.pipe.engine.decode_step, (list(laid_out), list(timed))
        state.pipe.engine.compile_decoding(many_rows=not blocked)
        assert state.pipe.engine.decode_step is step and (laid_out, timed) == before
    finally:
        state.engine.shutdown()


def test_a_compiled_engine_measures_which_int8_layout_is_faster_and_keeps_it(tiny, monkeypatch):
    # Which layout multiplies one row faster depends on the processor (BENCHMARKS.md): a compiled CPU engine times
    # both on its own layers and keeps the faster; the timing leaves every layer as it was and changes no output.
    import llava_next.engine as engine_module
    from llava_next.quantize import time_int8_layouts

    pipe = llava_next.load(tiny("mistral"), dtype="bfloat16", quantize="int8", progress=False, prefix_cache=False)
    layers = [m for m in pipe.model.language_model.modules() if isinstance(m, Int8Linear)]
    x = torch.randn(3, 64, layers[0].in_features).bfloat16()
    before = [layer.weight.clone() for layer in layers], layers[0](x)
    times = time_int8_layouts(pipe.model, repeats=2)
    assert set(times) == {"plain", "column blocks"} and all(t > 0 for t in times.values())
    assert not any(m.blocked for m in layers)
    assert all(torch.equal(a, m.weight) for a, m in zip(before[0], layers)) and torch.equal(layers[0](x), before[1])
    # past LAYOUT_PROBE_BYTES of weights it stops at the end of a group (a decoder layer's four): the rest of a 7B
    # model is never laid out twice
    import llava_next.quantize as quantize_module

    laid_out = []
    block_columns = Int8Linear.block_columns
    monkeypatch.setattr(Int8Linear, "block_columns", lambda self: (laid_out.append(self), block_columns(self))[1])
    monkeypatch.setattr(quantize_module, "LAYOUT_PROBE_BYTES", 1)
    handed_back = []  # (each replaced weight handed back to the system as it goes, quantize.lay_out_int8_layers)
    monkeypatch.setattr(quantize_module, "release_free_memory", lambda: handed_back.append(1))
    time_int8_layouts(pipe.model, repeats=1)
    decoding = quantize_module.decoding_int8_layers(pipe.model)
    assert len(decoding) > quantize_module.LAYOUT_PROBE_GROUP
    assert laid_out == decoding[:quantize_module.LAYOUT_PROBE_GROUP] and not any(m.blocked for m in decoding)
    assert len(handed_back) == 2 * quantize_module.LAYOUT_PROBE_GROUP  # into blocks, and back
    # the blocks are timed compiled for their fixed sizes, as the engine's step compiles them (mark_weights_static):
    # for symbolic sizes inductor's loop ran ~2x slower at 7B widths, and the engine chose the slower layout
    timed = []
    compiled = quantize_module._compiled_blocked_matmuls
    monkeypatch.setattr(quantize_module, "_compiled_blocked_matmuls",
                        lambda rows, blocks, scales: (timed.extend(blocks + scales), compiled(rows, blocks, scales))[1])
    time_int8_layouts(pipe.model, repeats=1)
    assert timed and all(getattr(t, "_dynamo_static_indices", None) == set(range(t.dim())) for t in timed)
    monkeypatch.undo()

    # the blocks are kept only when clearly faster (INT8_BLOCKS_MIN_SPEEDUP): a tie goes to the plain layout
    margin = engine_module.INT8_BLOCKS_MIN_SPEEDUP
    assert margin > 1
    monkeypatch.setattr(engine_module, "INT8_LAYOUT", "remeasure")  # (each load times again: new fake timings)
    for seconds, blocked in (({"plain": 2.0, "column blocks": 1.0}, True), ({"plain": 1.0, "column blocks": 2.0}, False),
                             ({"plain": 1.0, "column blocks": 1.0 / margin * 1.01}, False),
                             ({"plain": 1.0, "column blocks": 1.0 / margin * 0.99}, True)):
        monkeypatch.setattr(engine_module, "time_int8_layouts", lambda model, seconds=seconds: dict(seconds))
        pipe = llava_next.load(tiny("mistral"), dtype="bfloat16", quantize="int8", progress=False,
                               prefix_cache=False, compile=True)
        layers = [m for m in pipe.model.language_model.modules() if isinstance(m, Int8Linear)]
        assert pipe.engine.int8_blocks is blocked and pipe.engine.int8_layout_seconds == seconds
        assert pipe.engine.int8_layout_reason.startswith("measured")
        assert layers and all(m.blocked is blocked for m in layers)

    # without a working compiler the timing fails at the blocks: the engine is still built, its layers plain (and
    # its first step warns and decodes eagerly, as before)
    def no_compiler(model):  # (failing halfway: one layer already in blocks)
        next(m for m in model.language_model.modules() if isinstance(m, Int8Linear)).block_columns()
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(engine_module, "time_int8_layouts", no_compiler)
    pipe = llava_next.load(tiny("mistral"), dtype="bfloat16", quantize="int8", progress=False, prefix_cache=False,
                           compile=True)
    layers = [m for m in pipe.model.language_model.modules() if isinstance(m, Int8Linear)]
    assert pipe.engine.int8_blocks is False and not any(m.blocked for m in layers)
    assert pipe.engine.int8_layout_reason == "not measured: RuntimeError: no C++ compiler"

    # a model without int8 layers has nothing to time and nothing to block
    monkeypatch.setattr(engine_module, "time_int8_layouts", time_int8_layouts)
    pipe = llava_next.load(tiny("mistral"), dtype="bfloat16", progress=False, prefix_cache=False, compile=True)
    assert pipe.engine.int8_blocks is False and pipe.engine.int8_layout_seconds == {}
    assert pipe.engine.int8_layout_reason is None


def assert_same_greedy_answer(got, expected, tolerance: float = 0.005):
    """Two greedy answers from sums taken in different orders: the same tokens with log-probabilities within
    `tolerance`, until a step where `expected` itself had a near-tie (past it the answers may part). The tiny
    checkpoints' distributions are nearly flat (top-two gaps from 0.012 here), so the tolerance is about a bfloat16
    step of their logits, not more: a larger one would stop at the first step and compare nothing."""
    for step, (mine, theirs) in enumerate(zip(got.logprobs, expected.logprobs)):
        (_, best), (_, second) = theirs.top[:2]
        if best - second < 2 * tolerance:  # (each of the two may move by `tolerance`)
            return
        assert mine.token_id == theirs.token_id, f"step {step}: token {mine.token_id}, expected {theirs.token_id}"
        assert abs(mine.logprob - theirs.logprob) < tolerance, step
    assert got.token_ids == expected.token_ids


@pytest.mark.skipif(not can_pack(torch.empty(0, dtype=torch.bfloat16)),
                    reason="oneDNN's blocked bfloat16 layout needs a CPU with native bfloat16")
def test_a_cpu_engine_keeps_its_bfloat16_decoding_weights_in_the_layout_it_measured_faster(tiny, monkeypatch):
    # One row through a plain bfloat16 weight runs torch.mv, through a blocked one oneDNN: the same sums, each faster
    # on some processors (BENCHMARKS.md). The engine times both on its decoding layers and keeps the faster; the
    # vision tower and projector (prompts only) stay blocked; the answers are the same in either layout (up to a
    # near-tie, as the sums' order differs).
    import llava_next.engine as engine_module
    from llava_next.quantize import bf16_stand_ins, decoding_bf16_layers, time_bf16_layouts

    monkeypatch.setattr(engine_module, "BF16_LAYOUT", "blocked")
    pipe = llava_next.load(tiny("mistral"), dtype="bfloat16", progress=False, prefix_cache=False)
    layers = decoding_bf16_layers(pipe.model)
    assert layers and all(m.packed for m in layers) and pipe.engine.bf16_layout == "blocked"
    assert pipe.engine.bf16_layout_reason == "set by LLAVA_NEXT_BF16_LAYOUT=blocked"
    x = torch.randn(1, layers[0].in_features).bfloat16()
    with torch.inference_mode():  # (with autograd on, FastLinear runs F.linear on the dense weight in either layout)
        blocked_out = layers[0](x)
    expected = pipe.generate(chat("Describe it."), [smooth_image(300, 200)], max_new_tokens=6, logprobs=2)
    times = time_bf16_layouts(layers, repeats=2)
    # (the timing ends in the plain layout)
    assert set(times) == {"blocked", "plain"} and all(t > 0 for t in times.values()) and not any(m.packed for m in layers)
    # before loading, the layouts are timed on stand-ins of the layers' shapes, in the same order, plain (all of
    # them here: the tiny model's weights are far under the probe's LAYOUT_PROBE_BYTES)
    stand_ins = bf16_stand_ins([(m.out_features, m.in_features) for m in layers])
    assert [(m.out_features, m.in_features) for m in stand_ins] == [(m.out_features, m.in_features) for m in layers]
    assert not any(m.packed for m in stand_ins) and all(m.weight.dtype == torch.bfloat16 for m in stand_ins)
    times = time_bf16_layouts(stand_ins, repeats=2)
    assert set(times) == {"blocked", "plain"} and all(t > 0 for t in times.values())
    calls = []
    monkeypatch.setattr(torch, "mv", lambda *args, mv=torch.mv: (calls.append("mv"), mv(*args))[1])
    with torch.inference_mode():
        plain_out = layers[0](x)
    assert calls == ["mv"]  # one row on a plain bfloat16 weight: PyTorch's matrix-vector kernel
    exact = x.float() @ layers[0].weight.float().t()
    assert not layers[0].packed and torch.allclose(plain_out.float(), exact, rtol=1e-2, atol=1e-2)
    assert torch.allclose(plain_out.float(), blocked_out.float(), rtol=1e-2, atol=1e-2)
    layers[0].pack()
    with torch.inference_mode():
        assert torch.equal(layers[0](x), blocked_out)
    # with a bias (addmv), against nn.Linear in float32, in both layouts
    biased, row = torch.nn.Linear(64, 48).bfloat16(), torch.randn(1, 64).bfloat16()
    fast, want = FastLinear(biased), row.float() @ biased.weight.float().t() + biased.bias.float()
    with torch.inference_mode():
        for packed in (False, True):
            fast.pack() if packed else fast.unpack()
            assert fast.packed == packed and torch.allclose(fast(row).float(), want, rtol=1e-2, atol=1e-2)
    monkeypatch.undo()

    # the blocked layout replaces the loaded one only when clearly faster: a tie stays plain
    margin = engine_module.BF16_BLOCKED_MIN_SPEEDUP
    assert margin > 1
    monkeypatch.setattr(engine_module, "BF16_LAYOUT", "remeasure")  # (each load times again: new fake timings)
    for seconds, layout in (({"blocked": 2.0, "plain": 1.0}, "plain"), ({"blocked": 1.0, "plain": 2.0}, "blocked"),
                            ({"plain": 1.0, "blocked": 1.0 / margin * 1.01}, "plain"),
                            ({"plain": 1.0, "blocked": 1.0 / margin * 0.99}, "blocked")):
        monkeypatch.setattr(engine_module, "time_bf16_layouts", lambda model, seconds=seconds: dict(seconds))
        pipe = llava_next.load(tiny("mistral"), dtype="bfloat16", progress=False, prefix_cache=False)
        assert pipe.engine.bf16_layout == layout and pipe.engine.bf16_layout_seconds == seconds
        assert pipe.engine.bf16_layout_reason.startswith("measured")
        assert all(m.packed == (layout == "blocked") for m in decoding_bf16_layers(pipe.model))
        assert all(m.packed for m in pipe.model.vision_tower.modules() if isinstance(m, FastLinear))
        got = pipe.generate(chat("Describe it."), [smooth_image(300, 200)], max_new_tokens=6, logprobs=2)
        assert_same_greedy_answer(got, expected)
    # a timing that fails (halfway: one layer already reordered) leaves the layers plain, and says why
    def refused(layers):
        layers[0].pack()
        raise RuntimeError("no such layout")

    monkeypatch.setattr(engine_module, "time_bf16_layouts", refused)
    pipe = llava_next.load(tiny("mistral"), dtype="bfloat16", progress=False, prefix_cache=False)
    assert pipe.engine.bf16_layout == "plain" and not any(m.packed for m in decoding_bf16_layers(pipe.model))
    assert pipe.engine.bf16_layout_reason == "not measured: RuntimeError: no such layout"
    # in place (a model converted after loading, as an adapter's merge is): the same, on the model's own layers
    assert engine_module.bf16_layout_for_decoding(pipe.model) == ("plain", {}, "not measured: RuntimeError: no such "
                                                                  "layout")
    assert not any(m.packed for m in decoding_bf16_layers(pipe.model))
    # laid out in place after loading, or while loading: the same weights, the same logits
    monkeypatch.setattr(engine_module, "BF16_LAYOUT", "blocked")
    while_loading = llava_next.load(tiny("mistral"), dtype="bfloat16", progress=False, prefix_cache=False)
    assert engine_module.bf16_layout_for_decoding(pipe.model)[0] == "blocked"
    assert all(m.packed for m in decoding_bf16_layers(pipe.model))
    prompt, _ = pipe.prepare(chat("Describe it."), [smooth_image(300, 200)])
    with torch.inference_mode():
        assert torch.equal(pipe.model(**prompt), while_loading.model(**prompt))
    # float32 models have nothing to lay out; an unknown layout in the environment is refused by name
    pipe = llava_next.load(tiny("mistral"), dtype="float32", progress=False)
    assert pipe.engine.bf16_layout is None and pipe.engine.bf16_layout_reason is None
    monkeypatch.setattr(engine_module, "BF16_LAYOUT", "columns")
    with pytest.raises(llava_next.errors.LlavaError,
                       match="LLAVA_NEXT_BF16_LAYOUT='columns'.*measure, remeasure, blocked, plain"):
        # (refused before any weight is read)
        monkeypatch.setattr(llava_next.pipeline, "load_weights", lambda *args, **kwargs: pytest.fail("loaded"))
        llava_next.load(tiny("mistral"), dtype="bfloat16", progress=False)


@pytest.mark.skipif(not can_pack(torch.empty(0, dtype=torch.bfloat16)),
                    reason="oneDNN's blocked bfloat16 layout needs a CPU with native bfloat16")
@pytest.mark.parametrize("name", ["mistral", "vicuna_tied"])
def test_loading_asks_for_the_bfloat16_layout_under_the_shapes_the_engine_remembers_it_by(tiny, monkeypatch, name):
    # The engine remembers its layout choice under its decoding layers' shapes; loading chooses it before those
    # layers exist, so it must name the same layers in the same order (a tied lm_head is the embedding's: not one)
    from llava_next.quantize import decoding_bf16_layers

    asked = []
    monkeypatch.setattr(llava_next.pipeline, "bf16_layout_before_loading",
                        lambda shapes: (asked.append(shapes), (None, {}, None))[1])
    pipe = llava_next.load(tiny(name), dtype="bfloat16", progress=False, prefix_cache=False)
    layers = decoding_bf16_layers(pipe.model)
    assert asked == [[(m.out_features, m.in_features) for m in layers]] and len(layers) > 1
    tied = pipe.model.lm_head.weight is pipe.model.language_model.embed_tokens.weight
    assert tied == (name == "vicuna_tied") and (pipe.model.lm_head in layers) != tied


@pytest.mark.skipif(not can_pack(torch.empty(0, dtype=torch.bfloat16)),
                    reason="oneDNN's blocked bfloat16 layout needs a CPU with native bfloat16")
def test_a_measured_bfloat16_layout_is_remembered_for_later_loads_on_the_same_machine(tiny, monkeypatch, tmp_path):
    # Timing the layouts is ~1 s of a medium model's ~2 s load: measured by the first two loads on a processor,
    # PyTorch, thread count and layer shapes, and remembered (layout_cache.py; the test's own cache directory,
    # conftest.py).
    import llava_next.engine as engine_module
    from llava_next import layout_cache
    from llava_next.quantize import decoding_bf16_layers

    timed = []

    def timing(seconds):
        def time_bf16_layouts(layers):
            # (timed before loading, on stand-ins of the decoding layers' shapes: nothing of the model is loaded)
            timed.append(seconds)
            assert all(m.weight.dtype == torch.bfloat16 and bool((m.weight == 1 / 64).all()) for m in layers)
            return dict(seconds)
        return time_bf16_layouts

    def load():
        return llava_next.load(tiny("mistral"), dtype="bfloat16", progress=False, prefix_cache=False)

    # the layout each load left the decoding layers in before its engine was built: the choice is made before loading
    # (set, remembered and trusted, or timed on stand-ins) and taken while the weights are read, so that no layer is
    # ever held in both layouts beside the rest of the model
    loaded_blocked = []

    def load_weights(model, *args, read=llava_next.pipeline.load_weights, **kwargs):
        read(model, *args, **kwargs)
        loaded_blocked.append({m.packed for m in decoding_bf16_layers(model)})

    monkeypatch.setattr(llava_next.pipeline, "load_weights", load_weights)
    monkeypatch.setattr(engine_module, "BF16_LAYOUT", "measure")
    monkeypatch.setattr(engine_module, "time_bf16_layouts", timing({"blocked": 1.0, "plain": 2.0}))
    first = load()
    assert first.engine.bf16_layout == "blocked" and loaded_blocked == [{True}]
    assert first.engine.bf16_layout_reason.startswith("measured by load 1 of the 2 that time it;")
    (entry,) = json.loads(layout_cache.cache_file().read_text()).values()
    assert entry["seconds"] == {"blocked": 1.0, "plain": 2.0} and entry["measurements"] == 1 and len(timed) == 1
    # the second load measures again and keeps each layout's faster time (a busy machine only adds time), so one
    # measurement taken in a busy moment does not decide for good
    monkeypatch.setattr(engine_module, "time_bf16_layouts", timing({"blocked": 1.5, "plain": 1.2}))
    second = load()
    assert len(timed) == 2 and second.engine.bf16_layout_seconds == {"blocked": 1.0, "plain": 1.2}
    assert second.engine.bf16_layout == "blocked"
    assert second.engine.bf16_layout_reason.startswith("measured by load 2 of the 2")
    (entry,) = json.loads(layout_cache.cache_file().read_text()).values()
    assert entry["measurements"] == 2
    # later loads take the remembered choice without timing, and say where it came from
    monkeypatch.setattr(engine_module, "time_bf16_layouts", timing({"blocked": 2.0, "plain": 1.0}))
    third = load()
    assert len(timed) == 2 and third.engine.bf16_layout == "blocked"
    assert all(m.packed for m in decoding_bf16_layers(third.model)) and loaded_blocked == [{True}, {True}, {True}]
    # the environment's setting over the remembered choice: set plain, loaded plain
    monkeypatch.setattr(engine_module, "BF16_LAYOUT", "plain")
    assert load().engine.bf16_layout == "plain" and len(timed) == 2 and loaded_blocked[-1] == {False}
    monkeypatch.setattr(engine_module, "BF16_LAYOUT", "measure")
    assert third.engine.bf16_layout_seconds == {"blocked": 1.0, "plain": 1.2}
    assert "remembered in " + str(layout_cache.cache_file()) in third.engine.bf16_layout_reason
    assert load().engine.bf16_layout == "blocked" and len(timed) == 2
    # with another thread count the measurement does not hold: timed again (and remembered beside the first)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert load().engine.bf16_layout == "plain" and len(timed) == 3
    finally:
        torch.set_num_threads(threads)
    assert len(json.loads(layout_cache.cache_file().read_text())) == 2
    # remeasure: timed again, and the new choice replaces the old; its count starts again (one more load measures)
    monkeypatch.setattr(engine_module, "BF16_LAYOUT", "remeasure")  # (loaded plain, the remembered blocked ignored)
    assert load().engine.bf16_layout == "plain" and len(timed) == 4 and loaded_blocked[-1] == {False}
    monkeypatch.setattr(engine_module, "BF16_LAYOUT", "measure")
    assert load().engine.bf16_layout == "plain" and len(timed) == 5
    assert load().engine.bf16_layout == "plain" and len(timed) == 5 and loaded_blocked[-1] == {False}
    monkeypatch.setattr(engine_module, "BF16_LAYOUT", "blocked")  # (set: laid out while loading too)
    assert load().engine.bf16_layout == "blocked" and len(timed) == 5 and loaded_blocked[-1] == {True}
    monkeypatch.setattr(engine_module, "BF16_LAYOUT", "measure")
    # a damaged file, or remembered timings that are not whole: measured again, and the file is whole again
    whole = json.loads(layout_cache.cache_file().read_text())
    damaged = [{"seconds": {"plain": 1.0}, "date": "2026-11-28"}, {"seconds": {"plain": 1.0, "blocked": 2.0}},
               {"seconds": {"plain": float("nan"), "blocked": 2.0}, "date": "2026-11-28"},
               {"seconds": {"plain": True, "blocked": 2.0}, "date": "2026-11-28"},
               {"seconds": {"plain": 1.0, "blocked": 2.0}, "date": "2026-11-28", "measurements": 0},
               {"seconds": {"plain": 1.0, "blocked": 2.0}, "date": "2026-11-28", "measurements": True}]
    for damage in ["{not json", *(json.dumps(dict.fromkeys(whole, entry)) for entry in damaged)]:
        layout_cache.cache_file().write_text(damage)
        assert load().engine.bf16_layout == "plain"
        assert any(layout_cache.recall(key, ("blocked", "plain")) is not None for key in whole)
    assert len(timed) == 5 + 1 + len(damaged)
    # an entry from before the count was kept stands for one measurement: measured once more, then trusted
    layout_cache.cache_file().write_text(json.dumps(dict.fromkeys(
        whole, {"seconds": {"plain": 1.0, "blocked": 0.5}, "date": "2026-11-28"})))
    assert load().engine.bf16_layout == "blocked" and len(timed) == 5 + 1 + len(damaged) + 1
    assert load().engine.bf16_layout == "blocked" and len(timed) == 5 + 1 + len(damaged) + 1
    # a cache that cannot be written (here a file where the directory should be): loading works, measuring each time
    measured = len(timed)
    (tmp_path / "not-a-directory").write_text("")
    monkeypatch.setenv("LLAVA_NEXT_CACHE_DIR", str(tmp_path / "not-a-directory"))
    assert load().engine.bf16_layout == "plain" and load().engine.bf16_layout == "plain"
    assert len(timed) == measured + 2
    # no home to keep it in (no HOME, no passwd entry): nothing remembered, nothing fails
    monkeypatch.delenv("LLAVA_NEXT_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(layout_cache.Path, "home", lambda: (_ for _ in ()).throw(RuntimeError("no home")))
    assert layout_cache.cache_file() is None and layout_cache.recall("any", ("blocked", "plain")) is None
    assert load().engine.bf16_layout == "plain" and len(timed) == measured + 3


HOLD_THE_MEASURING_LOCK = """
import sys
from llava_next import layout_cache
with layout_cache.measuring():
    print("measuring", flush=True)
    sys.stdin.readline()  # (until the test lets go)
    if sys.argv[1:]:
        layout_cache.remember(sys.argv[1], {"oneDNN": 2.0, "PyTorch": 1.0}, measurements=int(sys.argv[2]))
"""


def test_processes_that_load_together_measure_one_after_another(tiny, monkeypatch):
    # A server's workers start together. Timing their layers at once, each would time the others' competition for
    # the memory; one measures while the others wait, and they find its timing remembered (layout_cache.measuring).
    import subprocess
    import sys
    import threading

    import llava_next.engine as engine_module
    from llava_next import layout_cache

    fcntl = pytest.importorskip("fcntl")  # (Windows has no locks: loads there measure without one)
    timed = []

    def time_float32_kernels(model):
        timed.append(1)
        return {"oneDNN": 1.0, "PyTorch": 3.0}

    monkeypatch.setattr(engine_module, "time_float32_kernels", time_float32_kernels)
    monkeypatch.setattr(engine_module, "FLOAT32_KERNEL", "measure")

    def load():
        return llava_next.load(tiny("mistral"), dtype="float32", progress=False, prefix_cache=False)

    load()
    (key,) = json.loads(layout_cache.cache_file().read_text())
    layout_cache.cache_file().unlink()
    timed.clear()

    def hold_the_lock(*args):
        holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_MEASURING_LOCK, *args], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        if holder.stdout.readline() != "measuring\n":
            holder.kill()
            pytest.fail("the process meant to hold the lock did not take it")
        return holder

    def let_go(holder):
        holder.stdin.write("\n")
        holder.stdin.close()
        assert holder.wait(timeout=60) == 0

    # another process is measuring: this load waits for it (seen by the lock refusing it), then takes its timing
    # without timing
    refused = threading.Event()

    def flock(file, operation, lock=fcntl.flock):
        try:
            return lock(file, operation)
        except BlockingIOError:
            refused.set()
            raise

    monkeypatch.setattr(fcntl, "flock", flock)
    holder = hold_the_lock(key, "2")
    loaded, failed = [], []

    def load_in_thread():
        try:
            loaded.append(load())
        except BaseException as e:  # (re-raised below, in the test's own thread)
            failed.append(e)

    waiting = threading.Thread(target=load_in_thread)
    try:
        waiting.start()
        assert refused.wait(timeout=60) and not loaded and not failed  # (waiting for the lock)
    finally:
        let_go(holder)
        waiting.join(timeout=60)
    assert not waiting.is_alive(), "the load waited for the lock after it was let go"
    if failed:
        raise failed[0]
    (pipe,) = loaded
    assert timed == [] and pipe.engine.float32_kernel == "pytorch"
    assert pipe.engine.float32_kernel_seconds == {"oneDNN": 2.0, "PyTorch": 1.0}
    assert "remembered in" in pipe.engine.float32_kernel_reason
    # a trusted timing is taken without the lock: a process measuring other layers does not hold this load up (were it
    # to wait, it would give up after 10 s, and the test fail, rather than after the usual 120)
    monkeypatch.setattr(layout_cache, "LOCK_WAIT_SECONDS", 10.0)
    refused.clear()
    holder = hold_the_lock()
    try:
        pipe = load()
    finally:
        let_go(holder)
    assert not refused.is_set() and timed == [] and "remembered in" in pipe.engine.float32_kernel_reason
    # a process that holds the lock too long (LOCK_WAIT_SECONDS) is not waited for: this one measures, and says so
    layout_cache.cache_file().unlink()
    monkeypatch.setattr(layout_cache, "LOCK_WAIT_SECONDS", 0.2)
    holder = hold_the_lock()
    try:
        pipe = load()
    finally:
        let_go(holder)
    assert refused.is_set() and timed == [1] and pipe.engine.float32_kernel == "onednn"
    assert pipe.engine.float32_kernel_reason.startswith(
        "measured by load 1 of the 2 that time it (without waiting longer than 0.2 s for another process")
    # ... and what that process remembers while this one measures is kept, not overwritten: this load's timing is
    # merged with it as with any remembered one (a count of 2 stays 2: the count stops where a timing is trusted)
    measuring = engine_module.time_float32_kernels
    for holders_count in ("1", "2"):
        layout_cache.cache_file().unlink()
        refused.clear()
        holder = hold_the_lock(key, holders_count)

        def time_float32_kernels_while_the_holder_remembers(model, holder=holder):
            let_go(holder)  # (it remembers its timing and ends)
            return measuring(model)

        monkeypatch.setattr(engine_module, "time_float32_kernels", time_float32_kernels_while_the_holder_remembers)
        try:
            pipe = load()
        finally:
            if holder.poll() is None:
                let_go(holder)
        assert refused.is_set() and pipe.engine.float32_kernel_seconds == {"oneDNN": 1.0, "PyTorch": 1.0}
        assert pipe.engine.float32_kernel_reason.startswith(
            "measured by load 2 of the 2 that time it, each layout's time")
        assert json.loads(layout_cache.cache_file().read_text())[key] == {
            "seconds": {"oneDNN": 1.0, "PyTorch": 1.0}, "measurements": 2, "date": datetime.date.today().isoformat()}
    monkeypatch.setattr(engine_module, "time_float32_kernels", measuring)
    assert timed == [1, 1, 1]
    # a timing that does not give seconds for each choice is not remembered, and says what it gave
    monkeypatch.setattr(engine_module, "FLOAT32_KERNEL", "remeasure")
    for wrong in ({"oneDNN": 1.0}, {"oneDNN": 1.0, "PyTorch": float("nan")},
                  {"oneDNN": 1.0, "PyTorch": 2.0, "MKL": 3.0}):
        monkeypatch.setattr(engine_module, "time_float32_kernels", lambda model, wrong=wrong: dict(wrong))
        pipe = load()
        assert pipe.engine.float32_kernel == "pytorch" and pipe.engine.float32_kernel_seconds == {}
        assert pipe.engine.float32_kernel_reason.startswith(f"not measured: ValueError: the timing gave {wrong}")
    assert json.loads(layout_cache.cache_file().read_text())[key]["seconds"] == {"oneDNN": 1.0, "PyTorch": 1.0}


def test_a_cpu_engine_multiplies_w8a8s_single_rows_in_the_form_it_measured_faster(tiny, monkeypatch):
    # One row through torch._int_mm (quantized to int8) read the weights faster than int8's weight-only kernel on two
    # AMD EPYCs and slower at 7B widths on an Intel Xeon with AMX (BENCHMARKS.md): the engine times both on the
    # decoding layers and keeps the faster; a server's engine (many rows) multiplies one row weight-only while it runs
    import llava_next.engine as engine_module
    from llava_next.engine import BackgroundEngine
    from llava_next.quantize import decoding_w8a8_layers, time_w8a8_one_row

    def load():
        return llava_next.load(tiny("mistral"), dtype="bfloat16", quantize="w8a8", progress=False, prefix_cache=False)

    pipe = load()
    layers = decoding_w8a8_layers(pipe.model)
    assert layers and pipe.engine.w8a8_one_row in ("int8 rows", "weight-only")
    assert pipe.engine.w8a8_one_row_reason.startswith("measured")
    assert all(m.one_row_int8 == (pipe.engine.w8a8_one_row == "int8 rows") for m in layers)
    vision = [m for m in pipe.model.vision_tower.modules() if isinstance(m, W8A8Linear)]
    assert vision and not set(map(id, vision)) & set(map(id, layers))  # (prompts only: never one row)
    times = time_w8a8_one_row(pipe.model, repeats=2)
    assert set(times) == {"int8 rows", "weight-only"} and all(t > 0 for t in times.values())
    assert all(m.one_row_int8 == (pipe.engine.w8a8_one_row == "int8 rows") for m in layers)  # (left as they were)

    def answer(pipe):
        return pipe.generate(chat("Describe it."), [smooth_image(300, 200)], max_new_tokens=6).token_ids

    monkeypatch.setattr(engine_module, "W8A8_ONE_ROW", "remeasure")  # (each load times again: new fake timings)
    answers = {}
    for seconds, form in (({"int8 rows": 1.0, "weight-only": 2.0}, "int8 rows"),
                          ({"int8 rows": 1.0, "weight-only": 1.0}, "weight-only"),
                          ({"int8 rows": 2.0, "weight-only": 1.0}, "weight-only")):
        monkeypatch.setattr(engine_module, "time_w8a8_one_row", lambda model, seconds=seconds: dict(seconds))
        pipe = load()
        assert pipe.engine.w8a8_one_row == form and pipe.engine.w8a8_one_row_seconds == seconds
        assert all(m.one_row_int8 == (form == "int8 rows") for m in decoding_w8a8_layers(pipe.model))
        answers.setdefault(form, answer(pipe))
        assert answer(pipe) == answers[form]
    # a server's scheduler (several slots): weight-only, so a request's numbers do not depend on the others; a
    # single answer afterwards (a scheduler of one slot) as a freshly loaded pipeline's
    monkeypatch.setattr(engine_module, "time_w8a8_one_row", lambda model: {"int8 rows": 1.0, "weight-only": 2.0})
    pipe = load()
    server = BackgroundEngine(pipe.engine, slots=4, capacity=512)
    assert not any(m.one_row_int8 for m in decoding_w8a8_layers(pipe.model))
    server.shutdown()
    assert answer(pipe) == answers["int8 rows"] and all(m.one_row_int8 for m in decoding_w8a8_layers(pipe.model))
    # a batch likewise, down to its last row (a sequence's numbers then do not depend on when the others finish):
    # the weight-only form's tokens; the chosen form for a single answer afterwards
    prompts = [chat("Describe it."), chat("What is in the picture, and where?")]
    images = [[smooth_image(300, 200)], [smooth_image(200, 300, seed=1)]]

    def batch(pipe):
        lengths = (3, 9)  # (one row runs alone at the end)
        return [[g.token_ids for g in pipe.generate(prompts, images, max_new_tokens=n)] for n in lengths]

    int_mm_rows = []
    monkeypatch.setattr(torch, "_int_mm", lambda a, b, f=torch._int_mm: (int_mm_rows.append(a.shape[0]), f(a, b))[1])
    answer(pipe)
    assert 1 in int_mm_rows  # (alone, its decoding rows in int8)
    int_mm_rows.clear()
    got = batch(pipe)
    assert int_mm_rows and 1 not in int_mm_rows  # (prompts only)
    int_mm_rows.clear()
    answer(pipe)
    assert 1 in int_mm_rows and all(m.one_row_int8 for m in decoding_w8a8_layers(pipe.model))
    monkeypatch.setattr(engine_module, "W8A8_ONE_ROW", "weight-only")
    assert got == batch(load())
    # a failed timing keeps the weight-only kernel and says why; the environment can fix the form; an unknown one is
    # refused
    monkeypatch.setattr(engine_module, "W8A8_ONE_ROW", "remeasure")
    monkeypatch.setattr(engine_module, "time_w8a8_one_row", lambda model: 1 / 0)
    pipe = load()
    assert pipe.engine.w8a8_one_row == "weight-only"
    assert pipe.engine.w8a8_one_row_reason == "not measured: ZeroDivisionError: division by zero"
    monkeypatch.setattr(engine_module, "W8A8_ONE_ROW", "int8 rows")
    pipe = load()
    assert pipe.engine.w8a8_one_row == "int8 rows" and pipe.engine.w8a8_one_row_seconds == {}
    assert pipe.engine.w8a8_one_row_reason == "set by LLAVA_NEXT_W8A8_ONE_ROW=int8 rows"
    monkeypatch.setattr(engine_module, "W8A8_ONE_ROW", "int_mm")
    with pytest.raises(llava_next.errors.LlavaError, match="LLAVA_NEXT_W8A8_ONE_ROW='int_mm'.*int8 rows, weight-only"):
        load()
    monkeypatch.setattr(engine_module, "W8A8_ONE_ROW", "measure")
    pipe = llava_next.load(tiny("mistral"), dtype="bfloat16", quantize="int8", progress=False)
    assert pipe.engine.w8a8_one_row is None and pipe.engine.w8a8_one_row_reason is None


def test_a_cpu_engine_runs_its_float32_linears_through_the_kernel_it_measured_faster(tiny, monkeypatch):
    # oneDNN's float32 matmul read a decoding step's weights at twice MKL's speed on an AMD EPYC; on an Intel Xeon
    # with AMX PyTorch's own (F.linear) was the faster (BENCHMARKS.md). The engine times both on the decoding layers
    # and runs every float32 linear, the vision tower's too, through the faster; the answers are the same.
    import llava_next.engine as engine_module
    import llava_next.quantize as quantize_module
    from llava_next.quantize import float32_fast_linears, time_float32_kernels

    def load():
        return llava_next.load(tiny("mistral"), dtype="float32", progress=False, prefix_cache=False)

    pipe = load()
    linears = float32_fast_linears(pipe.model)
    assert {name.split(".")[0] for name, _ in linears} >= {"vision_tower", "language_model", "lm_head"}
    assert pipe.engine.float32_kernel in ("onednn", "pytorch")
    assert pipe.engine.float32_kernel_reason.startswith("measured")
    times = time_float32_kernels(pipe.model, repeats=2)
    assert set(times) == {"oneDNN", "PyTorch"} and all(t > 0 for t in times.values())
    assert all(m.onednn == (pipe.engine.float32_kernel == "onednn") for _, m in linears)  # (as the engine set them)
    expected = pipe.generate(chat("Describe it."), [smooth_image(300, 200)], max_new_tokens=6, logprobs=2)
    # each kernel is what runs, and they agree to float32 rounding
    layer, x = linears[0][1], torch.randn(3, linears[0][1].in_features)
    exact = (x.double() @ layer.weight.double().t() + layer.bias.double()).float()
    calls = []
    monkeypatch.setattr(quantize_module, "onednn_linear", lambda *args, f=quantize_module.onednn_linear: (
        calls.append(1), f(*args))[1])
    with torch.inference_mode():
        for onednn in (True, False):
            layer.onednn = onednn
            assert torch.allclose(layer(x), exact, rtol=1e-5, atol=1e-5)
    assert len(calls) == 1
    monkeypatch.undo()

    monkeypatch.setattr(engine_module, "FLOAT32_KERNEL", "remeasure")  # (each load times again: new fake timings)
    for seconds, kernel in (({"oneDNN": 1.0, "PyTorch": 2.0}, "onednn"), ({"oneDNN": 1.0, "PyTorch": 1.0}, "onednn"),
                            ({"oneDNN": 2.0, "PyTorch": 1.0}, "pytorch")):
        monkeypatch.setattr(engine_module, "time_float32_kernels", lambda model, seconds=seconds: dict(seconds))
        pipe = load()
        assert pipe.engine.float32_kernel == kernel and pipe.engine.float32_kernel_seconds == seconds
        assert all(m.onednn == (kernel == "onednn") for _, m in float32_fast_linears(pipe.model))
        got = pipe.generate(chat("Describe it."), [smooth_image(300, 200)], max_new_tokens=6, logprobs=2)
        assert_same_greedy_answer(got, expected, tolerance=1e-4)
    # remembered: the next load measures once more (each kernel's faster time kept), and the one after takes the
    # timings without timing
    monkeypatch.setattr(engine_module, "FLOAT32_KERNEL", "measure")
    monkeypatch.setattr(engine_module, "time_float32_kernels", lambda model: {"oneDNN": 3.0, "PyTorch": 1.5})
    pipe = load()
    assert pipe.engine.float32_kernel == "pytorch"
    assert pipe.engine.float32_kernel_seconds == {"oneDNN": 2.0, "PyTorch": 1.0}
    monkeypatch.setattr(engine_module, "time_float32_kernels", lambda model: pytest.fail("timed again"))
    pipe = load()
    assert pipe.engine.float32_kernel == "pytorch" and "remembered in" in pipe.engine.float32_kernel_reason
    # a failed timing (most likely oneDNN's kernel failing) takes PyTorch's, and says why; the environment can fix
    # the choice; an unknown one is refused
    monkeypatch.setattr(engine_module, "FLOAT32_KERNEL", "remeasure")
    monkeypatch.setattr(engine_module, "time_float32_kernels", lambda model: 1 / 0)
    pipe = load()
    assert pipe.engine.float32_kernel == "pytorch" and not any(m.onednn for _, m in float32_fast_linears(pipe.model))
    assert pipe.engine.float32_kernel_reason == "not measured: ZeroDivisionError: division by zero"
    monkeypatch.setattr(engine_module, "FLOAT32_KERNEL", "onednn")
    pipe = load()
    assert pipe.engine.float32_kernel == "onednn" and pipe.engine.float32_kernel_seconds == {}
    assert pipe.engine.float32_kernel_reason == "set by LLAVA_NEXT_FLOAT32_KERNEL=onednn"
    assert all(m.onednn for _, m in float32_fast_linears(pipe.model))
    monkeypatch.setattr(engine_module, "FLOAT32_KERNEL", "mkl")
    with pytest.raises(llava_next.errors.LlavaError, match="LLAVA_NEXT_FLOAT32_KERNEL='mkl'.*onednn, pytorch"):
        load()
    # a bfloat16 model has no float32 linears to choose for
    monkeypatch.setattr(engine_module, "FLOAT32_KERNEL", "measure")
    pipe = llava_next.load(tiny("mistral"), dtype="bfloat16", progress=False)
    assert pipe.engine.float32_kernel is None and pipe.engine.float32_kernel_reason is None


REMEMBER_MANY = """
import sys
from llava_next import layout_cache
for i in range(40):
    layout_cache.remember(f"{sys.argv[1]}-{i}", {"oneDNN": 1.0, "PyTorch": 2.0})
"""


def test_the_measuring_lock_nests_and_writers_that_measured_without_it_lose_no_entry(monkeypatch):
    import subprocess
    import sys
    import time

    from llava_next import layout_cache

    pytest.importorskip("fcntl")  # (Windows has no locks)
    # a load inside a load (one thread) is given the lock its outer one holds, at once, instead of waiting for itself
    monkeypatch.setattr(layout_cache, "LOCK_WAIT_SECONDS", 2.0)
    with layout_cache.measuring() as outer:
        began = time.monotonic()
        with layout_cache.measuring() as inner:
            assert (outer, inner) == ("locked", "locked") and time.monotonic() - began < 1
        with layout_cache.measuring() as again:  # (and again after the inner one let go: the outer still holds it)
            assert again == "locked"
    # processes writing at once, without the measuring lock (one that waited too long, say): every entry survives
    writers = [subprocess.Popen([sys.executable, "-c", REMEMBER_MANY, f"writer{n}"]) for n in range(4)]
    assert [w.wait(timeout=120) for w in writers] == [0, 0, 0, 0]
    entries = json.loads(layout_cache.cache_file().read_text())
    assert sorted(entries) == sorted(f"writer{n}-{i}" for n in range(4) for i in range(40))


@pytest.mark.parametrize("setting, value, allowed", [
    ("INT8_LAYOUT", "columns", "measure, remeasure, blocks, plain"),
    ("BF16_LAYOUT", "columns", "measure, remeasure, blocked, plain"),
    ("FLOAT32_KERNEL", "mkl", "measure, remeasure, onednn, pytorch"),
    ("W8A8_ONE_ROW", "int_mm", "measure, remeasure, int8 rows, weight-only"),
])
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_an_unknown_engine_setting_in_the_environment_is_refused_by_name_before_any_weight_is_read(
        tiny, monkeypatch, setting, value, allowed, quantize):
    # whatever the load's dtype or quantization: a typo is not found only after minutes of loading a 7B model
    monkeypatch.setattr(llava_next.engine, setting, value)
    # (nor is a checkpoint downloaded first)
    monkeypatch.setattr(llava_next.pipeline, "resolve_checkpoint", lambda *args, **kwargs: pytest.fail("resolved"))
    with pytest.raises(llava_next.errors.LlavaError, match=f"LLAVA_NEXT_{setting}={value!r}.*{allowed}"):
        llava_next.load(tiny("mistral"), dtype="float32", quantize=quantize, progress=False, compile=True)


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_cpu_decoding_of_rows_at_different_lengths_gives_the_eager_tokens(tiny):
    # Two prompts of different lengths decode together (each row writes its own slot: the second KV write operator)
    # for 70 steps, across key blocks, on one graph: int4 kernels' layouts and masks of the same width must not be
    # merged into one size and specialised.
    prompts = [chat("Describe it."), chat("What colour is the large shape in the middle of this picture?")]
    images = [[smooth_image(300, 200)], [smooth_image(120, 260)]]
    results = []
    for compile in (False, True):
        pipe = llava_next.load(tiny("mistral"), dtype="bfloat16", quantize="int4", progress=False,
                               prefix_cache=False, compile=compile)
        pipe.engine.eos_token_ids = []
        torch._dynamo.utils.counters.clear()
        results.append([g.token_ids for g in pipe.generate(prompts, images, max_new_tokens=70)])
    assert results[0] == results[1]
    assert pipe.engine.decode_step is not pipe.model
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("family", ["vicuna", "mistral"])
def test_static_decoding_gives_the_same_tokens_and_reuses_its_kv_space(tiny, family):
    # The decoding form CUDA graphs need (compile on a GPU): whole KV space, masked, kept between requests. Run
    # here eagerly: rows of different lengths, and a second request in the space the first one left dirty.
    plain = llava_next.load(tiny(family), dtype="float32", progress=False, prefix_cache=False)
    static = llava_next.load(tiny(family), dtype="float32", progress=False, prefix_cache=False)
    static.engine.static_decode = True
    prompts = [chat("Describe it."), chat("What colour is the large shape in the middle of this picture?")]
    images = [smooth_image(300, 200), smooth_image(120, 260)]
    for _ in range(2):
        want = plain.generate(prompts, [[im] for im in images], max_new_tokens=7)
        got = static.generate(prompts, [[im] for im in images], max_new_tokens=7)
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
        space = static.engine._kv_space
        assert space is not None and space.capacity % 256 == 0
    assert static.engine._kv_space is space  # the second request reused the first one's space


def test_on_cuda_attention_over_varying_key_lengths_leaves_out_cudnn_and_restores_the_settings():
    from llava_next.engine import varying_length_attention

    cuda = torch.backends.cuda
    before = (cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(),
              cuda.math_sdp_enabled())
    assert before[0]  # PyTorch's default, which the test would otherwise not see change
    with varying_length_attention(torch.device("cuda")):
        assert not cuda.cudnn_sdp_enabled()
        assert cuda.flash_sdp_enabled() and cuda.mem_efficient_sdp_enabled() and cuda.math_sdp_enabled()
    with varying_length_attention(torch.device("cpu")):
        assert cuda.cudnn_sdp_enabled()
    assert (cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(),
            cuda.math_sdp_enabled()) == before


def test_prompts_and_eager_decoding_steps_run_under_the_varying_length_attention(tiny, monkeypatch):
    import contextlib

    import llava_next.engine as engine

    pipe = llava_next.load(tiny("mistral"), dtype="float32", progress=False)
    pipe.engine.eos_token_ids = []
    entered = []

    @contextlib.contextmanager
    def recording(device):
        entered.append(f"enter {device.type}")
        yield
        entered.append("exit")

    monkeypatch.setattr(engine, "varying_length_attention", recording)
    model_forward = type(pipe.model).forward

    def counted(self, *args, **kwargs):
        entered.append("model")
        return model_forward(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe.model), "forward", counted)
    pipe.generate(chat("Describe it."), [smooth_image(300, 200)], max_new_tokens=5)
    # the prompt and four decoding steps, each model call inside its own entry
    assert entered == ["enter cpu", "model", "exit"] * 5


def reference_attention(q, keys, values, length, mask):
    """One query per row, plainly in float32: q (B, 1, H, D) over the first `length` slots -> (B, 1, H * D)."""
    b, _, heads, dim = q.shape
    k = keys[:, :, :length].float().repeat_interleave(heads // keys.shape[1], dim=1)  # (B, H, S, D)
    v = values[:, :, :length].float().repeat_interleave(heads // keys.shape[1], dim=1)
    scores = q.float().transpose(1, 2) @ k.transpose(-1, -2) * dim**-0.5  # (B, H, 1, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, 1, heads * dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [1, 63, 64, 65, 130, 200, 700])
def test_decode_attention_over_a_cache_slice_is_attention_over_exactly_those_keys(dtype, length):
    from llava_next.model.decoder import decode_attention

    torch.manual_seed(length)
    b, kv_heads, heads, dim, capacity = 3, 2, 6, 16, 720
    keys, values = torch.randn(2, b, kv_heads, capacity, dim).to(dtype)  # slots past `length` hold stale numbers
    q = torch.randn(b, 1, heads, dim).to(dtype)
    # rows of different lengths; at 700 the shortest row's mask leaves whole blocks of SDPA's kernel (512 keys)
    # with no visible key
    lengths = torch.tensor([length, max(1, length - 5), max(1, length // 8)])
    mask = (torch.arange(length)[None] < lengths[:, None])[:, None, None]
    for row_mask in (None, mask):
        got = decode_attention(q, keys, values, length, row_mask)
        # the same floats as a cache exactly `length` slots long: what a sequence gets does not depend on the size
        # of the cache it decodes in
        exact = decode_attention(q, keys[:, :, :length].clone(), values[:, :, :length].clone(), length, row_mask)
        assert torch.equal(got, exact)
        expected = reference_attention(q, keys, values, length, row_mask)
        assert relative_error(got.float(), expected) < (1e-5 if dtype == torch.float32 else 2e-2)
        if row_mask is not None:  # each row as if alone, over its own keys only
            for row, n in enumerate(lengths.tolist()):
                alone = reference_attention(q[row : row + 1], keys[row : row + 1], values[row : row + 1], n, None)
                assert relative_error(got[row : row + 1].float(), alone) < (1e-5 if dtype == torch.float32 else 2e-2)


def test_decode_attention_takes_sdpa_output_in_the_layout_cuda_returns(monkeypatch):
    # CUDA's flash and memory-efficient kernels return (B, KV, H / KV, D) whose memory is (B, H / KV, KV, D): a
    # view to (B, 1, H * D) failed on the GPU (found on an H200), so the CPU gets that layout here
    import llava_next.model.decoder as decoder

    torch.manual_seed(0)
    b, kv_heads, heads, dim, length = 2, 4, 8, 16, 40
    keys, values = torch.randn(2, b, kv_heads, length, dim)
    q = torch.randn(b, 1, heads, dim)
    expected = decoder.decode_attention(q, keys, values, length, None)
    sdpa = decoder.F.scaled_dot_product_attention

    def transposed_memory(*args, **kwargs):
        out = sdpa(*args, **kwargs)
        return out.transpose(1, 2).contiguous().transpose(1, 2)

    monkeypatch.setattr(decoder.F, "scaled_dot_product_attention", transposed_memory)
    got = decoder.decode_attention(q, keys, values, length, None)
    assert torch.equal(got, expected)
    assert relative_error(got, reference_attention(q, keys, values, length, None)) < 1e-5


def test_rope_in_fewer_operations_is_the_reference_rotation_bit_for_bit(tiny):
    from llava_next.model.decoder import Decoder, apply_rope

    cfg = read_config(tiny("llama3_rope") / "config.json").text
    decoder = Decoder(cfg)
    positions = torch.tensor([[0, 1, 7, 300], [5, 6, 7, 8]])
    x = torch.randn(2, 4, 3, cfg.head_dim)
    for dtype in (torch.float32, torch.bfloat16):
        cos, signed_sin = decoder.rope_tables(positions, dtype)
        # the reference: cat(freqs, freqs), cos/sin in float32 then cast; x * cos + rotate_half(x) * sin
        freqs = positions[..., None].float() * decoder.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        ref_cos, ref_sin = emb.cos().to(dtype)[:, :, None], emb.sin().to(dtype)[:, :, None]
        x1, x2 = x.to(dtype).chunk(2, dim=-1)
        expected = x.to(dtype) * ref_cos + torch.cat((-x2, x1), dim=-1) * ref_sin
        assert torch.equal(cos, ref_cos)
        assert torch.equal(apply_rope(x.to(dtype), cos, signed_sin), expected)


def test_rms_norm_in_one_call_is_the_two_step_reference_in_float32():
    from llava_next.model.decoder import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(64, 1e-6)
    norm.weight.data = torch.randn(64) * 0.1 + 1
    for rows in (1, 5, 300):
        x = torch.randn(2, rows, 64) * 3
        expected = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        assert torch.equal(norm(x), expected)


FAULTS_OF_A_PROMPT = """
import resource, sys, torch, llava_next
llava_next.load(sys.argv[1], dtype="float32", progress=False)
def faults_of_a_prompt():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    activations = [torch.ones(n * 2**20) for n in (6, 2, 7, 4, 5)]  # 24 MB, 8 MB, ...: 96 MB, then all freed
    del activations
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print([faults_of_a_prompt() for _ in range(4)])
"""


@pytest.mark.skipif(not libc(), reason="the allocator's settings are glibc's")
@pytest.mark.parametrize("keep", ["1", "0"])
def test_a_cpu_engine_keeps_freed_activations_for_the_next_prompt(tiny, keep):
    # A prompt's activations, freed and taken again by the next prompt, are reused, not page-faulted in again page
    # by page (24,576 faults for 96 MB); LLAVA_NEXT_KEEP_FREED_MEMORY=0 leaves glibc's defaults, which hand most of
    # them back to the system in between.
    import os
    import subprocess
    import sys

    env = dict(os.environ, LLAVA_NEXT_KEEP_FREED_MEMORY=keep)
    out = subprocess.run([sys.executable, "-c", FAULTS_OF_A_PROMPT, str(tiny("vicuna"))], env=env,
                         capture_output=True, text=True, check=True).stdout
    faults = json.loads(out.splitlines()[-1])
    assert faults[0] > 20000  # the first prompt takes its memory from the system either way
    if keep == "1":
        assert faults[-1] < 100 and sum(faults[1:]) < 10000, faults
    else:  # glibc's own sliding thresholds settle at some point, but later than this
        assert sum(faults[1:]) > 20000, faults


LOAD_AND_ANSWER = """
import sys, llava_next
from PIL import Image
def imported():
    return [name for name in ("torch._dynamo", "sympy") if name in sys.modules]
pipe = llava_next.load(sys.argv[1], dtype=sys.argv[2], progress=False, quantize=sys.argv[3] or None)
print(imported())
pipe.generate("USER: <image> What is it? ASSISTANT:", [Image.new("RGB", (300, 200), "red")], max_new_tokens=3)
print(imported())
"""


@pytest.mark.parametrize("dtype, quantize", [("float32", ""), ("bfloat16", ""), ("bfloat16", "int8"),
                                             ("bfloat16", "int4"), ("bfloat16", "saved int4")])
def test_loading_and_answering_never_import_the_compiler(tiny, dtype, quantize, tmp_path):
    # Importing torch._dynamo takes 1.5-3 s (the first meta-device op with only a Python kernel, e.g. an
    # embedding's random init, imports it), and sympy ~1 s (a meta tensor's empty_like, which to_empty used): a load
    # that needs no compiler must not pay for either. The CLI's every command would.
    import subprocess
    import sys

    directory = tiny("mistral")
    if quantize == "saved int4":  # a checkpoint `llava-next quantize` wrote: build_quantized_model's load
        from llava_next.pipeline import save_quantized

        directory = save_quantized(llava_next.load(directory, dtype=dtype, progress=False, quantize="int4",
                                                   group_size=32), tmp_path / "int4")
        quantize = ""
    out = subprocess.run([sys.executable, "-c", LOAD_AND_ANSWER, str(directory), dtype, quantize],
                         capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["[]", "[]"]


def bench_llamacpp():
    """benchmarks/bench_llamacpp.py as a module (it imports llama_cpp only inside its runs)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_llamacpp", Path(__file__).parents[1] / "benchmarks" /
                                                  "bench_llamacpp.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_the_llama_cpp_benchmark_says_why_llama_cpp_died_on_an_illegal_instruction_and_how_to_rebuild_it():
    import signal
    import subprocess

    bench = bench_llamacpp()
    died = subprocess.CompletedProcess([], -signal.SIGILL, "", "")
    said = bench.failure("llama.cpp:q8_0", died)
    assert "illegal instruction (SIGILL)" in said and "-mno-amx-tile" in said and "--force-reinstall" in said
    # any other failure, or ours, gives its last line of errors
    assert bench.failure("ours:int8", died) == f"exit {-signal.SIGILL}"
    assert bench.failure("llama.cpp:q4_0", subprocess.CompletedProcess([], 1, "", "x\nno such file")) == "no such file"


def test_llamacpp_benchmark_pairs_q8_0_with_both_8_bit_modes_and_runs_it_once_a_round():
    bench = bench_llamacpp()
    assert bench.chosen_pairs("q8_0") == [("q8_0", "int8"), ("q8_0", "w8a8")]
    assert bench.chosen_pairs("q4_0,q8_0:w8a8") == [("q8_0", "w8a8"), ("q4_0", "int4")]
    assert bench.run_keys(bench.chosen_pairs("q8_0,q4_0")) == [
        "llama.cpp:q8_0", "ours:int8", "ours:w8a8", "llama.cpp:q4_0", "ours:int4"]
    with pytest.raises(ValueError, match="unknown --pairs q8_0:int4, q9: choose from f16, q8_0, q4_0 or f16:bfloat16"):
        bench.chosen_pairs("q9,q8_0:int4")


@pytest.mark.parametrize("amx", [False, True])
def test_bfloat16_vision_attention_runs_in_the_dtype_the_processor_multiplies_fastest(amx, monkeypatch):
    # Without AMX PyTorch's bfloat16 CPU attention is slower than float32's, so the tower upcasts q, k and v; with
    # AMX it is faster, so it does not (BENCHMARKS.md). Either way the output is bfloat16 attention's, to rounding.
    import torch.nn.functional as F

    from llava_next.config import VisionConfig
    from llava_next.model import vision

    monkeypatch.setattr(vision, "cpu_has_amx", lambda: amx)
    attention = vision.VisionAttention(VisionConfig(hidden_size=64, num_heads=4)).eval()
    x = torch.randn(3, 577, 64)
    with torch.inference_mode():
        exact = attention(x)
        attention.bfloat16()
        seen = []
        sdpa = F.scaled_dot_product_attention
        monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, *a, **k: (seen.append(q.dtype), sdpa(q, *a, **k))[1])
        out = attention(x.bfloat16())
    assert seen == [torch.bfloat16 if amx else torch.float32] and out.dtype == torch.bfloat16
    assert relative_error(out.float(), exact) < 2e-2
