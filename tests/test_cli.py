"""The `llava-next` command, as a user runs it."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import reference_model, reference_processor, smooth_image
import llava_next
from llava_next import cli
from llava_next.prompt import user_turn


@pytest.fixture
def picture(tmp_path) -> Path:
    path = tmp_path / "picture.png"
    smooth_image(500, 316, seed=21).save(path)
    return path


def run_cli(args, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json_prints_the_same_tokens_as_transformers_generate(tiny, picture):
    """The command-line tool, run as a separate process on a directory transformers wrote."""
    directory = tiny("v4_mistral")
    result = subprocess.run(
        [sys.executable, "-m", "llava_next.cli", "generate", "--model", directory, "--image", picture,
         "--prompt", "What is shown in this image?", "--max-new-tokens", "12", "--json"],
        capture_output=True, text=True, check=True,
    )
    output = json.loads(result.stdout)
    processor, model = reference_processor(directory), reference_model(directory)
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown in this image?"}]}]
    inputs = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True),
                       images=[Image.open(picture)], return_tensors="pt")
    expected = model.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert output["token_ids"] == expected.tolist()
    assert output["text"] == processor.decode(expected, skip_special_tokens=True)
    assert output["finish_reason"] in ("stop", "length") and output["prompt_tokens"] == inputs["input_ids"].shape[1]


def test_generate_streams_the_same_text(tiny, picture, capsys, load_pipeline):
    directory = tiny("vicuna")
    code, out, _ = run_cli(["generate", "--model", directory, "--image", picture, "--prompt", "Describe.",
                            "--max-new-tokens", "9"], capsys)
    assert code == 0
    expected = load_pipeline(directory).generate(
        [user_turn("Describe.", 1)], [picture], max_new_tokens=9)
    assert out == expected.text + "\n"


def test_raw_prompt_and_sampling_flags(tiny, picture, capsys):
    directory = tiny("mistral")
    args = ["generate", "--model", directory, "--image", picture, "--raw-prompt", "--prompt", "[INST] <image>\nHi [/INST]",
            "--temperature", "0.8", "--top-p", "0.9", "--seed", "4", "--max-new-tokens", "6", "--json"]
    first = json.loads(run_cli(args, capsys)[1])
    second = json.loads(run_cli(args, capsys)[1])
    assert first["token_ids"] == second["token_ids"] and len(first["token_ids"]) == 6


def test_info_reports_the_image_token_cost(tiny, picture, capsys):
    code, out, _ = run_cli(["info", "--model", tiny("v4_vicuna"), "--image", picture, "--json"], capsys)
    info = json.loads(out)
    assert code == 0 and info["model_type"] == "llava_next" and info["text_model_type"] == "llama"
    assert info["images"][0]["tokens"] == 1512 and info["chat_template"] == "chat_template.json"
    code, out, _ = run_cli(["info", "--model", tiny("llava15"), "--image", picture], capsys)
    assert "costs 576 tokens" in out and "llava, llama text model" in out
    for short, dtype in (("fp16", "float16"), ("bf16", "bfloat16"), ("fp32", "float32")):  # as load() takes them
        code, out, _ = run_cli(["info", "--model", tiny("llava15"), "--dtype", short, "--json"], capsys)
        assert code == 0 and json.loads(out)["dtype"] == dtype


@pytest.mark.parametrize("name", ["qwen2", "vicuna_tied"])
def test_info_counts_a_quantized_models_weights_as_the_parameters_they_stand_for(name, tiny, capsys):
    counts = {}
    for quantize in ([], ["--quantize", "int8"], ["--quantize", "int4", "--group-size", "32"], ["--quantize", "w8a8"]):
        code, out, _ = run_cli(["info", "--model", tiny(name), "--json", *quantize], capsys)
        counts[" ".join(quantize)] = json.loads(out)["parameters"]
    float_count = counts.pop("")
    pipe = llava_next.load(tiny(name), progress=False)
    assert float_count == sum(p.numel() for p in pipe.model.parameters())
    # int8 and int4 weights are buffers, not parameters; a tied lm_head's quantized copy is not counted twice
    assert set(counts.values()) == {float_count}, counts


def assert_info_recalls_then_remeasures(args, capsys, monkeypatch, setting, line, timings):
    """A second `info` measures again (a measurement is trusted once two loads have taken it, layout_cache.py); a
    third takes the remembered measurement and says so; with the setting at "remeasure" it times again."""
    import llava_next.engine as engine_module

    assert f"{line} (measured by load 2 of the 2 that time it, each layout's time the faster of this load's and " in \
        run_cli(args, capsys)[1]
    out = run_cli(args, capsys)[1]
    assert f"{line} (measured here on " in out and timings in out
    assert "remembered in " in out and f"LLAVA_NEXT_{setting}=remeasure times it again" in out
    monkeypatch.setattr(engine_module, setting, "remeasure")
    assert f"{line} (measured by load 1 of the 2 that time it; " in run_cli(args, capsys)[1]


def test_info_shows_the_int8_layout_a_compiled_engine_measured_and_chose(tiny, capsys, monkeypatch):
    import llava_next.engine as engine_module

    monkeypatch.setattr(engine_module, "time_int8_layouts", lambda model: {"plain": 0.002, "column blocks": 0.001})
    args = ["info", "--model", tiny("mistral"), "--quantize", "int8", "--compile", "--dtype", "bfloat16"]
    info = json.loads(run_cli([*args, "--json"], capsys)[1])
    assert info["int8_layout"].pop("reason").startswith("measured")
    assert info["int8_layout"] == {"layout": "column blocks", "ms_per_row": {"plain": 2.0, "column blocks": 1.0}}
    assert_info_recalls_then_remeasures(args, capsys, monkeypatch, "INT8_LAYOUT",
                                        "compiled int8 steps: column blocks layout",
                                        "one row through the first layers: plain 2.0 ms, column blocks 1.0 ms)")
    assert ("column blocks layout (measured by load 1 of the 2 that time it; column blocks are kept when more than "
            "1.05x") in run_cli(args, capsys)[1]
    monkeypatch.setattr(engine_module, "INT8_LAYOUT", "plain")  # chosen by the user: said so, nothing timed
    assert json.loads(run_cli([*args, "--json"], capsys)[1])["int8_layout"] == {
        "layout": "plain", "reason": "set by LLAVA_NEXT_INT8_LAYOUT=plain", "ms_per_row": {}}
    assert "compiled int8 steps: plain layout (set by LLAVA_NEXT_INT8_LAYOUT=plain)" in run_cli(args, capsys)[1]
    assert json.loads(run_cli(["info", "--model", tiny("mistral"), "--json"], capsys)[1])["int8_layout"] is None


def test_info_shows_the_bfloat16_layout_the_engine_measured_and_chose(tiny, capsys, monkeypatch):
    import llava_next.engine as engine_module
    from llava_next.quantize import can_pack

    monkeypatch.setattr(engine_module, "time_bf16_layouts", lambda model: {"blocked": 0.001, "plain": 0.003})
    args = ["info", "--model", tiny("mistral"), "--dtype", "bfloat16"]
    info = json.loads(run_cli([*args, "--json"], capsys)[1])
    if not can_pack(torch.empty(0, dtype=torch.bfloat16)):  # (nothing to lay out without native bfloat16)
        assert info["bf16_layout"] is None
        return
    assert info["bf16_layout"].pop("reason").startswith("measured")
    assert info["bf16_layout"] == {"layout": "blocked", "ms_per_row": {"blocked": 1.0, "plain": 3.0}}
    assert_info_recalls_then_remeasures(args, capsys, monkeypatch, "BF16_LAYOUT",
                                        "bfloat16 decoding weights: blocked layout", "blocked 1.0 ms, plain 3.0 ms)")
    assert ("blocked layout (measured by load 1 of the 2 that time it; the blocked layout is taken when more than "
            "1.05x") in run_cli(args, capsys)[1]
    assert json.loads(run_cli(["info", "--model", tiny("mistral"), "--dtype", "float32", "--json"],
                              capsys)[1])["bf16_layout"] is None


def test_info_shows_the_float32_kernel_the_engine_measured_and_chose(tiny, capsys, monkeypatch):
    import llava_next.engine as engine_module

    monkeypatch.setattr(engine_module, "time_float32_kernels", lambda model: {"oneDNN": 0.004, "PyTorch": 0.003})
    args = ["info", "--model", tiny("mistral"), "--dtype", "float32"]
    info = json.loads(run_cli([*args, "--json"], capsys)[1])
    assert info["float32_kernel"].pop("reason").startswith(
        "measured by load 1 of the 2 that time it; the faster for one row is taken")
    assert info["float32_kernel"] == {"kernel": "pytorch", "ms_per_row": {"oneDNN": 4.0, "PyTorch": 3.0}}
    assert_info_recalls_then_remeasures(args, capsys, monkeypatch, "FLOAT32_KERNEL", "float32 linears: pytorch kernel",
                                        "one row through the first layers: oneDNN 4.0 ms, PyTorch 3.0 ms)")
    assert json.loads(run_cli([*args[:-1], "bfloat16", "--json"], capsys)[1])["float32_kernel"] is None


def test_info_shows_the_w8a8_one_row_form_the_engine_measured_and_chose(tiny, capsys, monkeypatch):
    import llava_next.engine as engine_module

    monkeypatch.setattr(engine_module, "time_w8a8_one_row", lambda model: {"int8 rows": 0.001, "weight-only": 0.002})
    args = ["info", "--model", tiny("mistral"), "--quantize", "w8a8", "--dtype", "bfloat16"]
    info = json.loads(run_cli([*args, "--json"], capsys)[1])
    assert info["w8a8_one_row"].pop("reason").startswith(
        "measured by load 1 of the 2 that time it; the faster for one row is taken")
    assert info["w8a8_one_row"] == {"form": "int8 rows", "ms_per_row": {"int8 rows": 1.0, "weight-only": 2.0}}
    assert_info_recalls_then_remeasures(args, capsys, monkeypatch, "W8A8_ONE_ROW",
                                        "w8a8 decoding steps of one row: int8 rows form",
                                        "one row through the first layers: int8 rows 1.0 ms, weight-only 2.0 ms)")
    assert json.loads(run_cli([*args[:3], "--quantize", "int8", "--json"], capsys)[1])["w8a8_one_row"] is None


def test_chat_keeps_the_conversation_and_its_images(tiny, picture, load_pipeline, monkeypatch):
    directory = tiny("vicuna")
    stdin = io.StringIO(f"/image {picture}\nWhat is it?\nAnd the colours?\n/reset\nNew topic.\n")
    stdout = io.StringIO()
    args = cli.build_parser().parse_args(["chat", "--model", str(directory), "--max-new-tokens", "5"])
    assert cli.cmd_chat(args, stdin=stdin, stdout=stdout) == 0
    lines = stdout.getvalue().splitlines()
    pipe = load_pipeline(directory)
    first = pipe.generate([user_turn("What is it?", 1)], [picture], max_new_tokens=5).text
    second = pipe.generate([user_turn("What is it?", 1), {"role": "assistant", "content": first},
                            user_turn("And the colours?", 0)], [picture], max_new_tokens=5).text
    third = pipe.generate([user_turn("New topic.", 0)], max_new_tokens=5).text
    assert lines == [f"(image attached: {picture})", first, second, "(conversation cleared)", third]


@pytest.mark.parametrize("change,message", [
    ({"--image": "missing.png"}, "no such image file"),
    ({"--model": "/no/such/dir"}, "neither an existing directory nor a Hub id"),
    ({"--raw-prompt": None}, "the prompt has 0 <image> placeholders but 1 image was given"),
    ({"--temperature": "-1"}, "--temperature: temperature must be >= 0 (0 is greedy), got -1.0"),
])
def test_errors_are_one_clear_line(change, message, tiny, picture, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    options = {"--model": tiny("mistral"), "--image": picture, "--prompt": "Hi", **change}
    args = ["generate"] + [x for flag, value in options.items() for x in ([flag] if value is None else [flag, value])]
    code, out, err = run_cli(args, capsys)
    assert code == 2
    assert message in err and "Traceback" not in err and err.count("\n") == 1


HELP_AND_MISTAKES = """
import contextlib, io, sys
from llava_next.cli import main
shown = io.StringIO()
for argv in (["--help"], ["generate", "--help"], ["chat", "--help"], ["info", "--help"], ["quantize", "--help"],
             ["eval", "--help"], ["serve", "--help"], ["data", "synth", "--help"],
             ["generate", "--prompt", "Hi", "--quantize", "int5"], ["info", "--group-size", "100"]):
    with contextlib.redirect_stdout(shown), contextlib.redirect_stderr(shown), contextlib.suppress(SystemExit):
        main(argv)
print(shown.getvalue())
print("torch imported" if "torch" in sys.modules else "torch not imported")
"""


def test_help_and_mistyped_flags_answer_without_importing_torch():
    # importing torch takes ~2 s, which --help and a mistyped flag need not wait for (cli.py imports it only to run)
    result = subprocess.run([sys.executable, "-c", HELP_AND_MISTAKES], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("torch not imported")
    # ... and it still takes load()'s and SamplingParams' own defaults, shows them, and refuses what load() refuses
    import inspect

    from llava_next import SamplingParams, load
    from llava_next.load_options import DEFAULT_GROUP_SIZE
    from llava_next.quantize import QuantizeError

    defaults = {name: p.default for name, p in inspect.signature(load).parameters.items()}
    args = cli.build_parser().parse_args(["generate", "--prompt", "Hi"])
    assert [args.model, args.dtype, args.max_image_pixels, args.group_size, args.quantize, args.compile] == [
        defaults[name] for name in ("model", "dtype", "max_image_pixels", "group_size", "quantize", "compile")]
    shown = " ".join(result.stdout.split())  # (argparse wraps the help's lines)
    assert defaults["group_size"] is None  # (a quantized checkpoint's own, else DEFAULT_GROUP_SIZE)
    assert f"inputs per int4 scale (default {DEFAULT_GROUP_SIZE}; a quantized checkpoint's own)" in shown
    assert f"more pixels than this (default {defaults['max_image_pixels']})" in shown
    assert f"--max-new-tokens MAX_NEW_TOKENS default: the checkpoint's generation_config, else " \
           f"{SamplingParams().max_new_tokens}" in shown
    assert "argument --quantize: invalid choice: 'int5'" in shown
    with pytest.raises(QuantizeError, match="quantize must be one of int8, int4, w8a8, not 'int5'"):
        load("demo", quantize="int5")
    assert "argument --group-size: invalid choice: 100 (choose from 32, 64, 128, 256)" in shown
    # `python -m llava_next` is the same command
    module = subprocess.run([sys.executable, "-m", "llava_next", "info", "--group-size", "100"], capture_output=True,
                            text=True, timeout=300)
    assert module.returncode == 2 and "argument --group-size: invalid choice: 100" in module.stderr


def test_info_says_where_the_image_preprocessing_comes_from(tiny, tmp_path, capsys):
    import shutil

    copy = tmp_path / "ckpt"
    shutil.copytree(tiny("v4_vicuna"), copy)
    code, out, _ = run_cli(["info", "--model", copy, "--json"], capsys)
    assert json.loads(out)["image_processor"] == str(copy / "preprocessor_config.json")
    (copy / "preprocessor_config.json").unlink()  # a checkpoint that ships none: the defaults, and info says so
    code, out, _ = run_cli(["info", "--model", copy], capsys)
    assert code == 0 and f"image preprocessing: none in {copy}: the published LLaVA recipes' CLIP preprocessing at " \
                          "336 px" in out
