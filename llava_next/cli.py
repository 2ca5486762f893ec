"""The `llava-next` command. Each subcommand parses its flags and calls the typed function that holds the defaults."""

from __future__ import annotations

import argparse
import difflib
import inspect
import json
import sys
import warnings
from dataclasses import fields
from typing import Any, Sequence

# Only modules without torch here (~2 s to import): --help and argument errors answer without it. The commands
# import what they run.
from .data.synth import generate as synth_generate
from .data.tokenizer import texts_of, train_tokenizer
from .errors import LlavaError, LlavaWarning
from .eval.tasks import TASK_MODULES as TASK_NAMES
from .eval.vqa import evaluate
from .image import DEFAULT_MAX_PIXELS
from .load_options import DEFAULT_DTYPE, DEFAULT_GROUP_SIZE, DEFAULT_MODEL, DTYPE_NAMES, GROUP_SIZES, QUANTIZE_MODES
from .prompt import IMAGE_TOKEN, user_turn
from .sampling_params import GenerationError, SamplingParams

# Errors that are the user's to fix: one line on stderr, exit code 2, no traceback.
USER_ERRORS = (LlavaError, FileNotFoundError)


def whole_number(low: int, high: int | None = None):
    """An argparse type: an integer from `low` (to `high`), so that a count like --n -3 is refused by its flag's name
    before anything runs."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    parse.__name__ = "whole number"  # argparse names the type in its messages
    return parse


POSITIVE = whole_number(1)
NON_NEGATIVE = whole_number(0)


def _add_model_args(p: argparse.ArgumentParser, writes_checkpoint: bool = False) -> None:
    """The loading options of every command that loads a model; `quantize`, which writes the model it loads, needs
    --quantize and has no use for --compile."""
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="checkpoint directory, Hugging Face Hub id, or 'demo' (the bundled demo model; the default)")
    p.add_argument("--dtype", choices=["auto", *DTYPE_NAMES], default=DEFAULT_DTYPE, metavar="DTYPE",
                   help="weights and activations dtype: auto, float32, bfloat16 or float16 (or fp32, bf16, fp16) "
                        "(default auto: on a GPU the checkpoint's 16-bit dtype; on a CPU bfloat16 for 16-bit "
                        "checkpoints where the CPU has native bfloat16, else float32)")
    p.add_argument("--device", help="'cpu', 'cuda', 'cuda:1', ... (default: cuda when available)")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    p.add_argument("--max-image-pixels", type=POSITIVE, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse images with more pixels than this (default {DEFAULT_MAX_PIXELS})")
    p.add_argument("--quantize", choices=list(QUANTIZE_MODES), required=writes_checkpoint,
                   help="int8 / int4: weight-only (smaller, faster decoding); w8a8: int8 weights and activations "
                        "(faster prompts, and single-stream decoding, on CPUs with VNNI)"
                        + ("" if writes_checkpoint else ". Default: none"))
    if writes_checkpoint:
        p.set_defaults(compile=False)
    else:
        p.add_argument("--compile", action="store_true",
                       help="run decoding steps through torch.compile (CUDA graphs on a GPU; on a CPU 1.1-2x faster "
                            "decoding after a compile of 5-40 s, most with --quantize int8; `info --compile` shows the "
                            "int8 layout the engine measured to be faster here)")
    p.add_argument("--group-size", type=int, choices=list(GROUP_SIZES),
                   help=f"inputs per int4 scale (default {DEFAULT_GROUP_SIZE}; a quantized checkpoint's own)")
    p.add_argument("--vision-tower", help="original-layout checkpoints: the CLIP tower's directory or Hub id, instead "
                                          "of the one its config names (mm_vision_tower)")
    p.add_argument("--conv-template", help="original-layout checkpoints: the conversation template by name (e.g. "
                                           "llava_v1, mistral_instruct, chatml_direct), instead of the one the "
                                           "original CLI picks from the model's name")


def default_of(function, parameter: str) -> Any:
    """A function's default for one parameter: the CLI shows and uses the function's own, never a copy."""
    return inspect.signature(function).parameters[parameter].default


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    # Not given: the checkpoint's generation_config.json decides, then SamplingParams' defaults (shown here).
    d = SamplingParams()
    then = "default: the checkpoint's generation_config, else"
    p.add_argument("--max-new-tokens", type=POSITIVE, help=f"{then} {d.max_new_tokens}")
    p.add_argument("--temperature", type=float, help=f"0 is greedy ({then} {d.temperature})")
    p.add_argument("--top-k", type=NON_NEGATIVE, help=f"0 is no limit ({then} {d.top_k})")
    p.add_argument("--top-p", type=float, help=f"{then} {d.top_p}")
    p.add_argument("--repetition-penalty", type=float, help=f"1 is off ({then} {d.repetition_penalty})")
    p.add_argument("--seed", type=int, help="for reproducible sampling")
    p.add_argument("--stop", action="append", help="stop when the answer contains this (repeatable)")


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling options given on the command line (the rest come from the checkpoint or the defaults), checked
    before the model loads; a bad one is named by its flag."""
    given = {f.name: getattr(args, f.name) for f in fields(SamplingParams) if getattr(args, f.name, None) is not None}
    try:
        SamplingParams(**given).validate()
    except GenerationError as e:
        if e.param is None:
            raise
        raise GenerationError(f"--{e.param.replace('_', '-')}: {e}", param=e.param) from None
    return given


def _load(args: argparse.Namespace):
    from .pipeline import load

    return load(args.model, dtype=args.dtype, device=args.device, revision=args.revision,
                max_image_pixels=args.max_image_pixels, progress=sys.stderr.isatty(), quantize=args.quantize,
                group_size=args.group_size, compile=args.compile, vision_tower=args.vision_tower,
                conv_template=args.conv_template)


# -- generate ------------------------------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    sampling = _sampling(args)
    pipe = _load(args)
    images = list(args.image)
    if args.raw_prompt:
        prompt: Any = args.prompt
    else:
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + \
            [user_turn(args.prompt, len(images))]
    if args.json:
        result = pipe.generate(prompt, images, **sampling)
        print(json.dumps({
            "text": result.text, "token_ids": result.token_ids, "finish_reason": result.finish_reason,
            "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "model": str(args.model),
        }, ensure_ascii=False))
        return 0
    stream = pipe.stream(prompt, images, **sampling)
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


# -- chat ------------------------------------------------------------------------------------------------------------

CHAT_HELP = """Type a message and press enter. Commands:
  /image PATH   attach an image to your next message (repeat for several)
  /reset        forget the conversation
  /quit         leave (or end input with Ctrl-D)"""


def cmd_chat(args: argparse.Namespace, stdin=None, stdout=None) -> int:
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    sampling = _sampling(args)
    pipe = _load(args)
    interactive = stdin.isatty()
    messages: list[dict[str, Any]] = [{"role": "system", "content": args.system}] if args.system else []
    images: list[Any] = []  # every image of the conversation, in order
    pending: list[Any] = []  # attached to the next user message
    if interactive:
        print(CHAT_HELP, file=stdout)
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            if command == "/quit":
                break
            if command == "/reset":
                messages, images, pending = messages[:1] if args.system else [], [], []
                print("(conversation cleared)", file=stdout)
            elif command == "/image":
                if not rest.strip():
                    print("usage: /image PATH (an image file, attached to your next message)", file=stdout)
                    continue
                try:
                    pending.append(pipe.processor.load_image(rest.strip()))
                    print(f"(image attached: {rest.strip()})", file=stdout)
                except (LlavaError, OSError) as e:
                    print(f"error: {e}", file=stdout)
            elif command == "/help":
                print(CHAT_HELP, file=stdout)
            else:
                print(f"unknown command {command}; /help lists them", file=stdout)
            continue
        turn = user_turn(line, len(pending))
        try:
            stream = pipe.stream(messages + [turn], images + pending, **sampling)
            if interactive:
                stdout.write("assistant> ")
            for piece in stream:
                stdout.write(piece)
                stdout.flush()
            stdout.write("\n")
        except LlavaError as e:
            print(f"error: {e}", file=stdout)
            if IMAGE_TOKEN in line:  # (a place for an image, which a message without one cannot fill)
                print("(to show the model an image, attach it with /image PATH before your message)", file=stdout)
            if any(m["role"] == "user" for m in messages):  # (a conversation grows each turn until it no longer fits)
                print("(the conversation so far is part of every prompt: /reset starts a new one)", file=stdout)
            if pending:  # they went with the message that was not answered, and go with it
                print(f"(not sent: the message and its {len(pending)} image(s); /image attaches again)", file=stdout)
                pending = []
            continue
        messages += [turn, {"role": "assistant", "content": stream.generation.text}]
        images += pending
        pending = []
    return 0


# -- info ------------------------------------------------------------------------------------------------------------


def measured_choice(kind: str, chosen: str, reason: str, seconds: dict[str, float]) -> dict[str, Any]:
    return {kind: chosen, "reason": reason, "ms_per_row": {k: round(v * 1e3, 2) for k, v in seconds.items()}}


def cmd_info(args: argparse.Namespace) -> int:
    from .quantize import describe, parameter_count

    pipe = _load(args)
    cfg = pipe.config
    t, v = cfg.text, cfg.vision
    params = parameter_count(pipe.model)
    info: dict[str, Any] = {
        "model": str(args.model),
        "directory": str(pipe.directory),
        "model_type": cfg.model_type,
        "text_model_type": t.model_type,
        "parameters": params,
        "dtype": str(pipe.model.dtype).replace("torch.", ""),
        "dtype_reason": pipe.dtype_reason,
        "load_seconds": round(pipe.load_seconds, 3),
        "device": str(pipe.model.device),
        "text": {"layers": t.num_layers, "hidden_size": t.hidden_size, "heads": t.num_heads, "kv_heads": t.num_kv_heads,
                 "vocab_size": t.vocab_size, "context_window": t.max_position_embeddings, "rope_theta": t.rope.theta,
                 "sliding_window": t.sliding_window},
        "vision": {"layers": v.num_layers, "hidden_size": v.hidden_size, "tile_size": v.image_size,
                   "patch_size": v.patch_size, "feature_layer": cfg.vision_feature_layer,
                   "select_strategy": cfg.vision_feature_select_strategy},
        "image_grid_pinpoints": cfg.image_grid_pinpoints,
        "chat_template": pipe.processor.chat_template.origin,
        "image_processor": pipe.processor.image_processor.cfg.origin,
        "eos_token_ids": pipe.engine.eos_token_ids,
        "quantization": {"mode": pipe.quantization["mode"], "group_size": pipe.quantization["group_size"],
                         "layers": describe(pipe.quantization["layers"])} if pipe.quantization else None,
        # the engine's measured choices (a compiled CPU engine's int8 layout, a CPU engine's bfloat16 layout,
        # float32 kernel and w8a8 one-row form): what it chose, how, and the timings it chose by if it measured; None
        # where it chose none
        "int8_layout": measured_choice("layout", "column blocks" if pipe.engine.int8_blocks else "plain",
                                       pipe.engine.int8_layout_reason, pipe.engine.int8_layout_seconds)
        if pipe.engine.int8_layout_reason else None,
        "bf16_layout": measured_choice("layout", pipe.engine.bf16_layout, pipe.engine.bf16_layout_reason,
                                       pipe.engine.bf16_layout_seconds) if pipe.engine.bf16_layout else None,
        "float32_kernel": measured_choice("kernel", pipe.engine.float32_kernel, pipe.engine.float32_kernel_reason,
                                          pipe.engine.float32_kernel_seconds) if pipe.engine.float32_kernel else None,
        "w8a8_one_row": measured_choice("form", pipe.engine.w8a8_one_row, pipe.engine.w8a8_one_row_reason,
                                        pipe.engine.w8a8_one_row_seconds) if pipe.engine.w8a8_one_row else None,
        "layout": "original" if pipe.original else "llava-hf",
        "rules": pipe.original.rules() if pipe.original else {
            "pinpoints": "(height, width), transformers' reading", "unpad": "int(round(x, 7)), transformers'"},
    }
    if args.image:
        costs = []
        for path in args.image:
            im = pipe.processor.load_image(path, str(path))
            costs.append({"image": str(path), "width": im.width, "height": im.height,
                          "tokens": pipe.processor.image_tokens((im.height, im.width))})
        info["images"] = costs
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['model']}  ({cfg.model_type}, {t.model_type} text model, {params / 1e6:.1f}M parameters, "
          f"{info['dtype']} on {info['device']})")
    print(f"  dtype:  {info['dtype']} ({info['dtype_reason']}); loaded in {info['load_seconds']:.2f} s")
    print(f"  text:   {t.num_layers} layers, width {t.hidden_size}, {t.num_heads} heads ({t.num_kv_heads} kv), "
          f"vocab {t.vocab_size}, context {t.max_position_embeddings} tokens"
          + (f", sliding window {t.sliding_window}" if t.sliding_window else ""))
    print(f"  vision: CLIP {v.num_layers} layers, width {v.hidden_size}, {v.image_size} px tiles, patch {v.patch_size}, "
          f"features from layer {cfg.vision_feature_layer}")
    if cfg.image_grid_pinpoints:
        print(f"  anyres canvases (h x w): {', '.join(f'{h}x{w}' for h, w in cfg.image_grid_pinpoints)}")
    print(f"  chat template: {info['chat_template']}")
    print(f"  image preprocessing: {info['image_processor']}")
    print(f"  layout: {info['layout']}" + (" (behaving as the original LLaVA code):" if pipe.original else ""))
    if pipe.original:
        for what, rule in info["rules"].items():
            print(f"    {what}: {rule}")
    if info["quantization"]:
        print(f"  quantized: {info['quantization']['mode']} ({info['quantization']['layers']}; the vision tower, "
              "projector and embeddings stay float unless w8a8)")
    for what, entry, kind, timed_in_order in (
            ("compiled int8 steps", info["int8_layout"], "layout", ("plain", "column blocks")),
            ("bfloat16 decoding weights", info["bf16_layout"], "layout", ("blocked", "plain")),
            ("float32 linears", info["float32_kernel"], "kernel", ("oneDNN", "PyTorch")),
            ("w8a8 decoding steps of one row", info["w8a8_one_row"], "form", ("int8 rows", "weight-only"))):
        if entry:  # a choice the engine measured (or was told): what, how it was made, the timings it was made by
            timed = entry["ms_per_row"]
            print(f"  {what}: {entry[kind]} {kind} ({entry['reason']}"
                  + ("; one row through the first layers: " + ", ".join(f"{name} {timed[name]} ms"
                                                                         for name in timed_in_order) if timed else "")
                  + ")")
    for c in info.get("images", []):
        print(f"  {c['image']}: {c['width']}x{c['height']} px costs {c['tokens']} tokens")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoint import new_checkpoint_directory
    from .convert import convert

    new_checkpoint_directory(args.out)  # before the model loads: a bad --out costs nothing
    directory, changes = convert(args.model, args.out, vision_tower=args.vision_tower, conv_template=args.conv_template)
    print(f"wrote {directory} (llava-hf layout: transformers' LlavaForConditionalGeneration / "
          "LlavaNextForConditionalGeneration and llava-next load it)")
    print("what differs from the original code's behaviour in the converted checkpoint:")
    for change in changes:
        print(f"  - {change}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .checkpoint import new_checkpoint_directory
    from .pipeline import save_quantized
    from .quantize import describe

    new_checkpoint_directory(args.out)  # before the model loads: a bad --out costs nothing
    pipe = _load(args)
    out = save_quantized(pipe, args.out)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {out} ({args.quantize}: {describe(pipe.quantization['layers'])}; {size / 2**20:.0f} MiB of weights)")
    return 0


# -- train, data, eval ------------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from .train.recipe import read_recipe
    from .train.trainer import train

    overrides = list(args.set)
    for flag, key in (("output_dir", "train.output_dir"), ("max_steps", "train.max_steps"),
                      ("data", "data.path"), ("model", "model.path")):
        value = getattr(args, flag)
        if value is not None:  # (quoted: a path like 2024-05-01 or "run #2" is a string, not YAML's date or comment)
            overrides.append(f"{key}={json.dumps(value)}")
    recipe = read_recipe(args.config, overrides)
    train(recipe, resume=args.resume, progress=sys.stderr.isatty())
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    counts = synth_generate(args.out, args.n, args.seed, args.turns)
    print(f"wrote {args.n} images, {args.out}/captions.json and {args.out}/qa.json "
          f"({sum(counts.values())} questions: {', '.join(f'{k} {v}' for k, v in counts.items())})")
    return 0


def cmd_data_tokenizer(args: argparse.Namespace) -> int:
    from .prompt import builtin_template

    template = builtin_template(args.template) if args.template else None
    out = train_tokenizer(texts_of(args.data, template), args.out, args.vocab_size)
    print(f"wrote {out}/tokenizer.json")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .data.records import read_records
    from .eval.vqa import questions_of, write_predictions
    from .outputs import output_directory, output_file

    # where results go, checked before the model loads and the questions are answered
    if args.output and not args.task:
        raise LlavaError("--output goes with --task; without one, --predictions FILE writes the predictions")
    if args.predictions and args.task:
        raise LlavaError("--predictions goes without --task; with one, --output DIR writes predictions.jsonl")
    if args.output:
        output_directory(args.output)
    if args.predictions:
        output_file(args.predictions)
    if args.task:
        from .eval.runner import run_task
        from .eval.tasks import get_task

        get_task(args.task)  # an unknown name is an error before the model loads
        pipe = _load(args)
        result = run_task(pipe, args.task, args.data, args.output, args.limit, args.batch_size,
                          progress=sys.stderr.isatty(), model_name=str(args.model))
        print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
        return 0
    records = read_records(args.data, args.image_folder)  # a file or folder that will not do: before the load
    if not questions_of(records):
        raise LlavaError(f"{args.data}: no questions to ask: none of its records has a gpt turn to score")
    pipe = _load(args)
    result = evaluate(pipe, records, limit=args.limit, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                      progress=sys.stderr.isatty())
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    if result.total == 0 and result.skipped:
        n = len(result.skipped)
        raise LlavaError(f"no question was answered: {'the one question was' if n == 1 else f'all {n} were'} "
                         "skipped (the reasons are listed above)")
    if args.predictions:
        write_predictions(result, Path(args.predictions))
    return 0


# -- serve -----------------------------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    try:
        from .serve.app import ServeSettings, parse_bytes, serve  # noqa: F811
    except ImportError as e:
        raise LlavaError(f"the server needs the serve extra ({e.name} is missing): in the checkout, "
                         "pip install -e '.[serve]'") from None
    memory = {}
    for flag in ("kv_memory", "prefix_cache_memory"):
        value = getattr(args, flag)
        try:
            memory[flag] = parse_bytes(value) if value else None
        except ValueError as e:
            raise LlavaError(f"--{flag.replace('_', '-')}: {e}") from None
    settings = ServeSettings(
        model=args.model, served_name=args.served_model_name, host=args.host, port=args.port,
        api_key=args.api_key or os.environ.get("LLAVA_NEXT_API_KEY") or None, max_concurrent=args.max_concurrent,
        kv_memory=memory["kv_memory"], prefix_cache_memory=memory["prefix_cache_memory"], max_queue=args.max_queue,
        prefill_chunk=args.prefill_chunk, max_images=args.max_images,
        max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels,
        max_body_bytes=args.max_body_bytes, allow_remote_images=args.allow_remote_images,
        allowed_local_media_path=args.allowed_local_media_path, fetch_timeout=args.fetch_timeout,
        log_prompts=args.log_prompts, dtype=args.dtype, device=args.device, revision=args.revision,
        quantize=args.quantize, group_size=args.group_size, compile=args.compile, vision_tower=args.vision_tower,
        conv_template=args.conv_template)
    if settings.allowed_local_media_path and not os.path.isdir(settings.allowed_local_media_path):
        raise LlavaError(f"--allowed-local-media-path {settings.allowed_local_media_path}: not a directory")
    from .checkpoint import check_model_name
    from .engine import check_cpu_settings
    from .pipeline import resolve_device

    # (the model is loaded after the server listens: what would fail its load for certain is refused before)
    check_model_name(settings.model)
    if resolve_device(settings.device).type == "cpu":
        check_cpu_settings()
    serve(settings)
    return 0


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    from .serve.settings import ServeSettings

    d = ServeSettings()

    p.add_argument("--served-model-name", help="the model id clients send (default: the --model directory's name)")
    p.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host}: this machine only)")
    p.add_argument("--port", type=whole_number(0, 65535), default=d.port, help=f"(default {d.port})")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ routes (or set LLAVA_NEXT_API_KEY, "
                                     "which keeps the key out of the process list)")
    p.add_argument("--max-concurrent", type=POSITIVE, help="sequences generated at once (default: 8 on CPU, 32 on GPU, "
                                                      "fewer when the KV memory is short)")
    p.add_argument("--kv-memory", help="KV cache memory, e.g. 4GiB (default: a quarter of free memory on CPU, half "
                                       "of free GPU memory)")
    p.add_argument("--prefix-cache-memory", help="memory, beside the KV memory, for finished conversations' KV "
                                                 "caches, reused by their next turns, e.g. 1GiB (default: a quarter "
                                                 "of the KV memory; 0: the newest conversation's only)")
    p.add_argument("--max-queue", type=NON_NEGATIVE, default=d.max_queue,
                   help=f"requests waiting beyond the running ones before answering 429 (default {d.max_queue})")
    p.add_argument("--prefill-chunk", type=POSITIVE, default=d.prefill_chunk,
                   help=f"prompt tokens per step while other answers stream (default {d.prefill_chunk})")
    p.add_argument("--max-images", type=NON_NEGATIVE, default=d.max_images,
                   help=f"per request (default {d.max_images})")
    p.add_argument("--max-image-bytes", type=POSITIVE, default=d.max_image_bytes,
                   help=f"encoded bytes per image (default {d.max_image_bytes})")
    p.add_argument("--max-body-bytes", type=POSITIVE, default=d.max_body_bytes,
                   help=f"request body size (default {d.max_body_bytes})")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs (public addresses only; off by default)")
    p.add_argument("--allowed-local-media-path", metavar="DIR",
                   help="allow file:// URLs and paths under DIR (off by default)")
    p.add_argument("--fetch-timeout", type=float, default=d.fetch_timeout,
                   help=f"seconds for a remote image download (default {d.fetch_timeout})")
    p.add_argument("--log-prompts", action="store_true", help="log the messages of each request (off: ids, counts "
                                                              "and timings only)")


# -- entry point -----------------------------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse, and an unknown option answered with the known one it is closest to (--imge: did you mean --image?),
    also when the mistyped option is a required one (--promt: argparse would only say --prompt is missing)."""

    def parse_args(self, args=None, namespace=None):
        for command in self.subcommands():  # (their error messages name the commands that take an option they lack)
            command.root = self
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            command = self
            for name in ("command", "data_command"):  # the (sub)command that was run: its options are the known ones
                subcommands = command._subparsers._group_actions[0].choices if command._subparsers else {}
                command = subcommands.get(getattr(parsed, name, None), command)
            command.error(f"unrecognized arguments: {command.guessed(unknown)}")
        return parsed

    root: "Parser | None" = None  # (the top-level parser, for a subcommand's)

    def subcommands(self) -> list["Parser"]:
        """Every (sub)command below this parser."""
        below = list(self._subparsers._group_actions[0].choices.values()) if self._subparsers else []
        return below + [c for command in below for c in command.subcommands()]

    def commands_by_option(self) -> dict[str, list[str]]:
        """Each option of the (sub)commands below this parser -> the commands that take it ("data synth")."""
        found: dict[str, list[str]] = {}
        for command in self.subcommands():
            for option in {o for action in command._actions for o in action.option_strings} - {"-h", "--help"}:
                found.setdefault(option, []).append(command.prog.split(" ", 1)[-1])
        return found

    def guessed(self, unknown: list[str]) -> str:
        """The unknown options, each with the known one it is closest to, or the commands that take it where it is
        another command's (quantize --compile: the nearest option here would mislead)."""
        known = [o for action in self._actions for o in action.option_strings]
        elsewhere = self.root.commands_by_option() if self.root is not None else {}

        def hint(u: str) -> str:
            option = u.split("=")[0]
            if elsewhere and option in elsewhere:
                return f"{u} (an option of {', '.join(elsewhere[option])}, not of {self.prog.split(' ', 1)[-1]})"
            close = difflib.get_close_matches(option, known, n=1)
            return f"{u} (did you mean {close[0]}?)" if close else u

        return " ".join(hint(u) for u in unknown)

    def _parse_known_args(self, arg_strings, *rest, **options):
        self._arg_strings = arg_strings  # for error(): argparse checks required options before it returns unknown ones
        return super()._parse_known_args(arg_strings, *rest, **options)

    def error(self, message):
        if getattr(self, "_rechecking", False):
            raise _Recheck
        if message.startswith("the following arguments are required"):
            unknown = self._unrecognized()
            if unknown:
                message += f"; unrecognized arguments: {self.guessed(unknown)}"
        super().error(message)

    def _unrecognized(self) -> list[str]:
        """What argparse leaves unparsed in this (sub)command's arguments, its required options waived."""
        required = [action for action in self._actions if action.required]
        self._rechecking = True
        try:
            for action in required:
                action.required = False
            return self.parse_known_args(list(getattr(self, "_arg_strings", [])))[1]
        except _Recheck:  # another mistake: argparse's own message for the first one stands
            return []
        finally:
            for action in required:
                action.required = True
            self._rechecking = False


class _Recheck(Exception):
    """Parser._unrecognized's parse met an error of its own."""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="llava-next", description="Run LLaVA 1.5 and LLaVA-NeXT models.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="answer one prompt about images")
    _add_model_args(g)
    g.add_argument("--image", action="append", default=[], help="image file (repeat for several, in order)")
    g.add_argument("--prompt", required=True, help="the question; rendered with the model's chat template")
    g.add_argument("--system", help="a system message, for templates that have one")
    g.add_argument("--raw-prompt", action="store_true",
                   help="use --prompt as the exact model input, with one <image> per image, no chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object: text, token_ids (new tokens), ...")
    _add_sampling_args(g)
    g.set_defaults(run=cmd_generate)

    c = sub.add_parser("chat", help="talk with a model, attaching images with /image PATH")
    _add_model_args(c)
    c.add_argument("--system", help="a system message")
    _add_sampling_args(c)
    c.set_defaults(run=cmd_chat)

    i = sub.add_parser("info", help="what a checkpoint is, and what images cost")
    _add_model_args(i)
    i.add_argument("--image", action="append", default=[], help="show how many tokens this image costs")
    i.add_argument("--json", action="store_true")
    i.set_defaults(run=cmd_info)

    cv = sub.add_parser("convert", help="write a checkpoint of the original LLaVA code in the llava-hf layout")
    cv.add_argument("--model", required=True, help="the original-layout checkpoint (directory or Hub id)")
    cv.add_argument("--out", required=True, help="directory for the llava-hf checkpoint")
    cv.add_argument("--vision-tower", help="the CLIP tower, instead of the one its config names (mm_vision_tower)")
    cv.add_argument("--conv-template", help="the conversation template written as its chat template (default: the "
                                            "one the original CLI picks from the model's name)")
    cv.set_defaults(run=cmd_convert)

    q = sub.add_parser("quantize", help="write a quantized copy of a checkpoint that loads without quantizing again")
    _add_model_args(q, writes_checkpoint=True)
    q.add_argument("--out", required=True, help="directory for the quantized checkpoint")
    q.set_defaults(run=cmd_quantize)

    t = sub.add_parser("train", help="run one training stage from a recipe (YAML or JSON); torchrun for many processes")
    t.add_argument("--config", help="the recipe file; its keys mirror llava_next.train.recipe.Recipe")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set train.lr.projector=1e-3 (repeatable)")
    t.add_argument("--output-dir", dest="output_dir", help="= --set train.output_dir=...")
    t.add_argument("--max-steps", dest="max_steps", type=POSITIVE, help="= --set train.max_steps=...")
    t.add_argument("--data", help="= --set data.path=...")
    t.add_argument("--model", help="= --set model.path=... (a LLaVA checkpoint to continue from)")
    t.add_argument("--resume", help="'latest' (the newest checkpoint of the run) or a checkpoint directory")
    t.set_defaults(run=cmd_train)

    d = sub.add_parser("data", help="make data: synthetic shapes, or a tokenizer trained on a data set")
    dsub = d.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("synth", help="synthetic coloured-shapes images with captions and questions")
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=POSITIVE, required=True, help="number of images")
    s.add_argument("--seed", type=int, default=0)
    turns = default_of(synth_generate, "turns")
    s.add_argument("--turns", type=POSITIVE, default=turns, help=f"questions per image in qa.json (default {turns})")
    s.set_defaults(run=cmd_data_synth)
    k = dsub.add_parser("tokenizer", help="train a small BPE tokenizer on LLaVA-format data")
    k.add_argument("--data", nargs="+", required=True, help="LLaVA-format files")
    k.add_argument("--out", required=True)
    k.add_argument("--vocab-size", type=POSITIVE, default=default_of(train_tokenizer, "vocab_size"),
                   help="what BPE learns, the special tokens and the characters seen included; the 256 byte tokens "
                        "come on top (default %(default)s)")
    k.add_argument("--template", help="a built-in chat template whose markers the tokenizer should learn")
    k.set_defaults(run=cmd_data_tokenizer)

    e = sub.add_parser("eval", help="a standard benchmark (--task), or exact match on LLaVA-format questions")
    _add_model_args(e)
    e.add_argument("--task", help="a benchmark, scored as lmms-eval scores it: " + ", ".join(TASK_NAMES))
    e.add_argument("--data", required=True, help="with --task: the benchmark's dataset (parquet files or a directory "
                                                 "of them, a `datasets` directory, or its Hub id); without: a "
                                                 "LLaVA-format file, every gpt turn a question")
    e.add_argument("--output", help="with --task: write results.json and predictions.jsonl here (and resume from "
                                    "them)")
    e.add_argument("--image-folder", help="image paths are relative to this (default: the data file's folder)")
    e.add_argument("--limit", type=POSITIVE, help="only the first N questions")
    e.add_argument("--batch-size", type=POSITIVE, default=default_of(evaluate, "batch_size"))
    e.add_argument("--max-new-tokens", type=POSITIVE, default=default_of(evaluate, "max_new_tokens"))
    e.add_argument("--predictions", help="write every prediction to this JSON-lines file")
    e.add_argument("--json", action="store_true")
    e.set_defaults(run=cmd_eval)
    v = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with a web chat page (the serve extra)")
    _add_model_args(v)
    _add_serve_args(v)
    v.set_defaults(run=cmd_serve)
    return parser


def show_warning(message, category, filename, lineno, file=None, line=None, default=warnings.showwarning) -> None:
    """The package's own warnings as one line each on stderr, as its errors are; others as Python shows them."""
    if issubclass(category, LlavaWarning):
        print(f"llava-next: warning: {message}", file=sys.stderr)
    else:
        default(message, category, filename, lineno, file, line)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():  # (restores Python's filters and display for callers of main())
            warnings.simplefilter("always", LlavaWarning)  # every run says it, not only a process's first
            warnings.showwarning = show_warning
            return args.run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if not isinstance(e, USER_ERRORS):
            raise
        print(f"llava-next: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
