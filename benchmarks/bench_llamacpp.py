"""The language model against llama.cpp (llama-cpp-python), same decoder weights, same token count.

llama.cpp does not implement LLaVA-NeXT's anyres unpadding and row-newline packing, so this compares the part both
run: the mistral decoder of a benchmark preset (benchmarks/checkpoints.py), on a text-only prompt of --prompt-tokens
random token ids (1512 by default: what a 500x316 image costs), then --new-tokens greedy tokens. The decoder weights
are written to GGUF once (f16, with the q/k row order llama.cpp's rotary embedding expects), and quantized with
llama.cpp's own quantizer to q8_0 and q4_0. Pairs compared at the same bit width:

    llama.cpp f16   vs ours bfloat16      (16-bit weights)
    llama.cpp q8_0  vs ours int8          (8-bit weights; q8_0 has a scale per 32 weights, ours per row)
    llama.cpp q8_0  vs ours w8a8          (8-bit weights and activations: q8_0 also rounds the activations to int8,
                                           per 32 values, and multiplies in integers; w8a8 rounds them per token)
    llama.cpp q4_0  vs ours int4          (4-bit weights; q4_0 groups of 32, ours --group-size)

--pairs takes llama.cpp kinds (each with all its pairs) or single pairs as kind:mode, e.g. q8_0:w8a8.

Each configuration runs in its own process, interleaved over --rounds rounds, median reported. The last line is JSON.
--compile runs ours with compile=True (its decoding step through torch.compile; the warm-up compiles it).

    pip install llama-cpp-python gguf      # builds llama.cpp from source with cmake
    python benchmarks/bench_llamacpp.py --preset medium --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoints import PRESETS, build_checkpoint  # noqa: E402

PAIRS = [("f16", "bfloat16"), ("q8_0", "int8"), ("q8_0", "w8a8"), ("q4_0", "int4")]


def prompt_ids(n: int, vocab: int) -> list[int]:
    import random

    rng = random.Random(0)
    return [rng.randrange(100, vocab - 100) for _ in range(n)]


# -- GGUF --------------------------------------------------------------------------------------------------------


def write_gguf_f16(checkpoint: Path, out: Path) -> None:
    """The checkpoint's decoder as a llama-architecture GGUF file in float16 (norms in float32)."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    config = json.loads((checkpoint / "config.json").read_text())
    text = config["text_config"]
    heads, kv_heads = text["num_attention_heads"], text["num_key_value_heads"]
    vocab = text["vocab_size"]
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name("llava-next-bench decoder")
    writer.add_context_length(text.get("max_position_embeddings", 8192))
    writer.add_embedding_length(text["hidden_size"])
    writer.add_block_count(text["num_hidden_layers"])
    writer.add_feed_forward_length(text["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(text["hidden_size"] // heads)
    # transformers 5 writes rope_theta inside rope_parameters, 4.x beside the other fields
    theta = text.get("rope_theta") or text.get("rope_parameters", {}).get("rope_theta", 10000.0)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(text.get("rms_norm_eps", 1e-5)))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    # A sentencepiece-style vocabulary of the right size; the benchmark feeds token ids, so the strings never matter.
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581t{i}" for i in range(vocab - len(tokens))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + \
        [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (vocab - 259)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    def rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
        # transformers rotates the two halves of each head; llama.cpp rotates adjacent pairs: interleave the halves
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
    per_layer = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
                 "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
                 "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                 "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
                 "mlp.down_proj.weight": "ffn_down.weight"}
    files = sorted(checkpoint.glob("*.safetensors"))
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                name = key.removeprefix("model.")
                if name in ("lm_head.weight", "language_model.lm_head.weight"):
                    target = "output.weight"
                else:
                    name = name.removeprefix("language_model.").removeprefix("model.")
                    if name in names:
                        target = names[name]
                    elif name.startswith("layers."):
                        _, index, rest = name.split(".", 2)
                        target = f"blk.{index}.{per_layer[rest]}"
                    else:
                        continue  # vision tower, projector, image_newline
                tensor = f.get_tensor(key).float()
                array = tensor.numpy()
                if target.endswith("attn_q.weight"):
                    array = rope_rows(array, heads)
                elif target.endswith("attn_k.weight"):
                    array = rope_rows(array, kv_heads)
                array = array.astype(np.float32 if array.ndim == 1 else np.float16)
                writer.add_tensor(target, array)
                del tensor
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_file(cache: Path, preset: str, kind: str) -> Path:
    """The preset's decoder as GGUF of `kind` (f16, q8_0, q4_0), written on first use."""
    import llama_cpp

    out = cache / f"{preset}-decoder-{kind}.gguf"
    if out.exists():
        return out
    f16 = cache / f"{preset}-decoder-f16.gguf"
    if not f16.exists():
        write_gguf_f16(build_checkpoint(cache, preset), f16.with_suffix(".partial"))
        f16.with_suffix(".partial").rename(f16)
    if kind == "f16":
        return f16
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[kind]
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), params) != 0:
        raise SystemExit(f"llama.cpp could not quantize {f16} to {kind}")
    return out


# -- one run -----------------------------------------------------------------------------------------------------


def run_llamacpp(cache: Path, kind: str, args) -> dict:
    import llama_cpp
    import numpy as np

    path = gguf_file(cache, args.preset, kind)
    threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
    llm = llama_cpp.Llama(str(path), n_ctx=args.prompt_tokens + args.new_tokens + 8, n_batch=512, n_ubatch=512,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    ids = prompt_ids(args.prompt_tokens, llm.n_vocab())
    def next_token() -> int:
        # the last evaluated position's logits (llama-cpp-python keeps no copy unless logits_all is set)
        return int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).argmax())

    llm.eval(ids[:16])  # warm-up
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    prefill_s = time.perf_counter() - start
    token = next_token()
    start = time.perf_counter()
    for _ in range(args.new_tokens):
        llm.eval([token])
        token = next_token()
    decode_s = time.perf_counter() - start
    return {"prefill_tok_s": args.prompt_tokens / prefill_s, "decode_tok_s": args.new_tokens / decode_s,
            "file_mib": path.stat().st_size / 2**20, "threads": threads}


def run_ours(cache: Path, mode: str, args) -> dict:
    import torch

    import llava_next
    from llava_next import SamplingParams

    quantize = mode if mode in ("int8", "int4", "w8a8") else None
    dtype = mode if mode in ("float32", "bfloat16") else "bfloat16"
    # no prefix cache: the warm-up prompt must not shorten the timed prefill
    pipe = llava_next.load(build_checkpoint(cache, args.preset), dtype=dtype, quantize=quantize, progress=False,
                           prefix_cache=False, compile=args.compile)
    pipe.engine.eos_token_ids = []
    ids = torch.tensor([prompt_ids(args.prompt_tokens, pipe.config.text.vocab_size)])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    pipe.engine.generate({"input_ids": ids[:, :16], "attention_mask": inputs["attention_mask"][:, :16]},
                         SamplingParams(max_new_tokens=2))  # warm-up (and, with --compile, the compilation)
    gen = pipe.engine.generate(inputs, SamplingParams(max_new_tokens=args.new_tokens + 1))[0]
    return {"prefill_tok_s": args.prompt_tokens / gen.prefill_seconds,
            "decode_tok_s": args.new_tokens / gen.decode_seconds, "threads": torch.get_num_threads()}


def chosen_pairs(spec: str) -> list[tuple[str, str]]:
    """--pairs: llama.cpp kinds, each with all its pairs, or single pairs as kind:mode -> (kind, our mode) pairs."""
    wanted = spec.split(",")
    unknown = set(wanted) - {k for k, _ in PAIRS} - {f"{k}:{ours}" for k, ours in PAIRS}
    if unknown:
        raise ValueError(f"unknown --pairs {', '.join(sorted(unknown))}: choose from f16, q8_0, q4_0 or "
                         + ", ".join(f"{k}:{ours}" for k, ours in PAIRS))
    return [(k, ours) for k, ours in PAIRS if k in wanted or f"{k}:{ours}" in wanted]


def run_keys(pairs: list[tuple[str, str]]) -> list[str]:
    """The configurations a round runs, each once: a llama.cpp kind shared by two pairs runs once."""
    return list(dict.fromkeys(key for kind, ours in pairs for key in (f"llama.cpp:{kind}", f"ours:{ours}")))


# On an Intel Xeon with AMX, llama.cpp built with GGML_NATIVE (its AMX backend included) died at its first matmul
# with SIGILL (BENCHMARKS.md); built without AMX instructions it ran.
NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def failure(key: str, out: subprocess.CompletedProcess) -> str:
    """What a failed run says: its last line of errors, or for llama.cpp killed by an illegal instruction, why and
    what to do."""
    if key.startswith("llama.cpp") and out.returncode == -signal.SIGILL:
        from importlib.metadata import PackageNotFoundError, version

        try:
            installed = f"=={version('llama-cpp-python')}"
        except PackageNotFoundError:
            installed = ""
        return ("llama.cpp died on an illegal instruction (SIGILL): its build uses instructions this processor does "
                "not run for it (its AMX backend, on the one Intel Xeon with AMX tried). Rebuild it without them: "
                f"CMAKE_ARGS=\"-DGGML_NATIVE=ON -DCMAKE_C_FLAGS='{NO_AMX_FLAGS}' -DCMAKE_CXX_FLAGS='{NO_AMX_FLAGS}'\" "
                "pip install --force-reinstall --no-deps --no-cache-dir "
                f"llama-cpp-python{installed}")
    return (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default="medium")
    parser.add_argument("--prompt-tokens", type=int, default=1512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pairs", default="f16,q8_0,q4_0",
                        help="llama.cpp kinds (f16, q8_0, q4_0), or pairs as kind:mode (q8_0:w8a8)")
    parser.add_argument("--compile", action="store_true", help="ours with compile=True (decoding compiled)")
    parser.add_argument("--cache", default=os.environ.get("LLAVA_NEXT_BENCH_CACHE", "/tmp/llava-next-bench"))
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cache = Path(args.cache)
    if args.run:
        impl, mode = args.run.split(":")
        print(json.dumps((run_llamacpp if impl == "llama.cpp" else run_ours)(cache, mode, args)))
        return
    try:
        pairs = chosen_pairs(args.pairs)
    except ValueError as e:
        parser.error(str(e))
    keys = run_keys(pairs)
    for kind in dict.fromkeys(kind for kind, _ in pairs):
        gguf_file(cache, args.preset, kind)  # build once, outside the timed runs
    runs: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        for key in keys:
            out = subprocess.run([sys.executable, __file__, "--run", key, *sys.argv[1:]], capture_output=True,
                                 text=True)
            result = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else \
                {"error": failure(key, out)}
            runs.setdefault(key, []).append(result)
            print(f"round {r + 1} {key:16} {json.dumps(result)}", file=sys.stderr, flush=True)
    medians = {}
    for key, results in runs.items():
        good = [x for x in results if "error" not in x]
        medians[key] = {m: statistics.median(x[m] for x in good) for m in ("prefill_tok_s", "decode_tok_s")} \
            if good else results[0]
    print(f"\n{args.preset} decoder, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, median of "
          f"{args.rounds} interleaved rounds")
    print(f"{'':18}{'prefill tok/s':>15}{'decode tok/s':>15}")
    for key in keys:
        m = medians[key]
        print(f"{key:18}" + ("".join(f"{m[c]:15.1f}" for c in ("prefill_tok_s", "decode_tok_s"))
                             if "error" not in m else f" error: {m['error']}"))
    ratios = {}
    for kind, ours in pairs:
        a, b = medians[f"llama.cpp:{kind}"], medians[f"ours:{ours}"]
        if "error" not in a and "error" not in b:
            ratios[f"{ours}/{kind}"] = {"prefill": b["prefill_tok_s"] / a["prefill_tok_s"],
                                        "decode": b["decode_tok_s"] / a["decode_tok_s"]}
    print("ratios (ours / llama.cpp): " + "; ".join(f"{k}: prefill {v['prefill']:.2f}, decode {v['decode']:.2f}"
                                                   for k, v in ratios.items()))
    print(json.dumps({"preset": args.preset, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                      "rounds": args.rounds, "compile": args.compile, "results": medians, "ratios": ratios}))


if __name__ == "__main__":
    main()
