"""Broken checkpoints, devices and chat commands give one clear line (exit code 2), never a traceback."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import llava_next
from conftest import smooth_image
from llava_next import cli
from llava_next.checkpoint import CheckpointError
from llava_next.errors import LlavaError
from llava_next.pipeline import sampling_defaults
from llava_next.prompt import user_turn


def run_cli(args, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def broken_copies(tiny, tmp_path, name):
    """(file name, directory) for every JSON file of a checkpoint, each in its own copy, cut in half."""
    source = tiny(name)
    for path in sorted(source.glob("*.json")):
        target = tmp_path / f"{name}-{path.stem}"
        shutil.copytree(source, target)
        data = (target / path.name).read_bytes()
        (target / path.name).write_bytes(data[: len(data) // 2])
        yield path.name, target


@pytest.mark.parametrize("name", ["vicuna", "v4_vicuna"])
def test_every_corrupt_json_file_is_one_line_naming_it(name, tiny, tmp_path, capsys):
    tiny(name)
    capsys.readouterr()  # (what building the checkpoint printed, where this test is the first to need it)
    seen = []
    for file, directory in broken_copies(tiny, tmp_path, name):
        if file == "special_tokens_map.json":
            continue  # not read: tokenizer_config.json names the special tokens
        code, out, err = run_cli(["info", "--model", directory], capsys)
        assert code == 2, file
        assert "Traceback" not in err and err.count("\n") == 1, err
        assert file in err and ("not valid JSON" in err or "not a tokenizer the tokenizers library can read" in err), err
        seen.append(file)
    assert {"config.json", "tokenizer_config.json", "generation_config.json", "processor_config.json"} <= set(seen)
    if name == "v4_vicuna":
        assert {"chat_template.json", "preprocessor_config.json", "model.safetensors.index.json"} <= set(seen)


def test_json_that_is_not_an_object_and_a_shard_index_without_its_map(tiny, tmp_path, capsys):
    target = tmp_path / "odd"
    shutil.copytree(tiny("v4_vicuna"), target)
    (target / "generation_config.json").write_text("[1, 2]")
    code, _, err = run_cli(["info", "--model", target], capsys)
    assert code == 2 and "generation_config.json: expected a JSON object, found list" in err
    (target / "generation_config.json").write_text("{}")
    (target / "model.safetensors.index.json").write_text('{"metadata": {}}')
    code, _, err = run_cli(["info", "--model", target], capsys)
    assert code == 2 and "has no weight_map" in err


def test_a_corrupt_tokenizer_json_is_one_line(tiny, tmp_path, capsys):
    target = tmp_path / "tok"
    shutil.copytree(tiny("vicuna"), target)
    (target / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nonsense"}}')
    code, _, err = run_cli(["info", "--model", target], capsys)
    assert code == 2 and "tokenizer.json: not a tokenizer" in err and "Traceback" not in err


@pytest.mark.parametrize("device, message", [
    ("cuda", "no CUDA GPU here"), ("cuda:3", "no CUDA GPU here"), ("tpu", "not a device PyTorch knows"),
    ("cuda:x", "not a device PyTorch knows"), ("meta", "not supported"),
])
def test_unknown_and_absent_devices_are_one_line(device, message, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, _, err = run_cli(["info", "--device", device], capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_chat_survives_bad_image_commands(tmp_path):
    picture = tmp_path / "p.png"
    smooth_image(64, 64).save(picture)
    (tmp_path / "folder.jpg").mkdir()
    lines = ["/image https://example.com/cat.png", f"/image {tmp_path / 'missing.png'}",
             f"/image {tmp_path / 'folder.jpg'}", f"/image {picture}", "What color is the circle?", "/quit"]
    out = io.StringIO()
    assert cli.cmd_chat(cli.build_parser().parse_args(["chat", "--max-new-tokens", "3"]),
                        stdin=io.StringIO("\n".join(lines) + "\n"), stdout=out) == 0
    text = out.getvalue()
    assert text.count("error:") == 3 and "not fetched from URLs" in text
    assert f"(image attached: {picture})" in text
    assert text.strip().splitlines()[-1] not in ("", f"(image attached: {picture})")  # the question was answered


def test_chat_after_a_turn_that_failed_says_why_and_sends_nothing_of_it_later(tmp_path):
    picture = tmp_path / "p.png"
    smooth_image(64, 64).save(picture)
    too_long = "word " * 3000  # past the demo model's context window
    lines = ["/image", f"/image {picture}", "What is it?", f"/image {picture}", too_long, "What color is it?", "/quit"]
    out = io.StringIO()
    assert cli.cmd_chat(cli.build_parser().parse_args(["chat", "--max-new-tokens", "4"]),
                        stdin=io.StringIO("\n".join(lines) + "\n"), stdout=out) == 0
    shown = out.getvalue().splitlines()
    assert shown[0] == "usage: /image PATH (an image file, attached to your next message)"
    assert shown[1:2] == [f"(image attached: {picture})"] and shown[3:4] == [f"(image attached: {picture})"]
    assert shown[4].startswith("error: ") and "context window" in shown[4]
    assert shown[5:7] == ["(the conversation so far is part of every prompt: /reset starts a new one)",
                          "(not sent: the message and its 1 image(s); /image attaches again)"]
    # the next question goes with the first turn's image alone: its answer is that conversation's
    pipe = llava_next.load("demo", progress=False)
    first = pipe.generate([user_turn("What is it?", 1)], [picture], max_new_tokens=4).text
    last = pipe.generate([user_turn("What is it?", 1), {"role": "assistant", "content": first},
                          user_turn("What color is it?", 0)], [picture], max_new_tokens=4).text
    assert shown[2] == first and shown[7:] == [last]
    # the placeholder typed into a message: the command that attaches an image
    out = io.StringIO()
    assert cli.cmd_chat(cli.build_parser().parse_args(["chat"]), stdin=io.StringIO("What is <image> here?\n"),
                        stdout=out) == 0
    shown = out.getvalue().splitlines()
    assert len(shown) == 2 and shown[0].startswith("error: the messages have 1 image place without an image of its own")
    assert shown[1] == "(to show the model an image, attach it with /image PATH before your message)"
    # with a system message but no turn yet, a first message too long is not "the conversation so far"
    out = io.StringIO()
    assert cli.cmd_chat(cli.build_parser().parse_args(["chat", "--system", "Be brief."]),
                        stdin=io.StringIO(too_long + "\n"), stdout=out) == 0
    shown = out.getvalue().splitlines()
    assert len(shown) == 1 and "context window" in shown[0]


def test_command_line_defaults_are_the_functions_defaults():
    import inspect

    from llava_next.data.synth import generate as synth
    from llava_next.data.tokenizer import train_tokenizer
    from llava_next.eval.vqa import evaluate

    def default(function, name):
        return inspect.signature(function).parameters[name].default

    parser = cli.build_parser()
    g = parser.parse_args(["generate", "--prompt", "x"])
    assert (g.model, g.dtype, g.max_image_pixels, g.group_size) == tuple(
        default(llava_next.load, n) for n in ("model", "dtype", "max_image_pixels", "group_size"))
    e = parser.parse_args(["eval", "--data", "d.json"])
    assert (e.batch_size, e.max_new_tokens) == (default(evaluate, "batch_size"), default(evaluate, "max_new_tokens"))
    assert parser.parse_args(["data", "tokenizer", "--data", "a", "--out", "b"]).vocab_size == \
        default(train_tokenizer, "vocab_size")
    assert parser.parse_args(["data", "synth", "--out", "o", "--n", "1"]).turns == default(synth, "turns")
    # sampling flags left out mean "the checkpoint's or the engine's default", so nothing is passed on
    assert cli._sampling(g) == {}


def test_the_command_line_and_inference_never_import_training():
    code = ("import sys, llava_next, llava_next.cli as c; c.main(['info']); llava_next.load('demo', progress=False)"
            ".generate('<image> hi', ['examples/shapes.png'], max_new_tokens=2);"
            "bad = [m for m in sys.modules if m.startswith('llava_next.train')]; assert not bad, bad")
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]


def test_sampling_defaults_follow_generation_config(tiny, tmp_path):
    target = tmp_path / "sampling"
    shutil.copytree(tiny("vicuna"), target)
    config = json.loads((target / "generation_config.json").read_text())
    image = smooth_image(300, 200)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    greedy = llava_next.load(tiny("vicuna"), progress=False).generate(messages, [image], max_new_tokens=6)

    # do_sample false: greedy whatever temperature says; max_new_tokens and repetition_penalty apply
    (target / "generation_config.json").write_text(json.dumps(
        {**config, "do_sample": False, "temperature": 0.9, "top_p": 0.5, "max_new_tokens": 6}))
    pipe = llava_next.load(target, progress=False)
    assert pipe.sampling_defaults == {"max_new_tokens": 6}
    pipe.engine.eos_token_ids = []
    result = pipe.generate(messages, [image])
    assert len(result.token_ids) == 6 and result.token_ids[:len(greedy.token_ids)] == greedy.token_ids
    assert len(pipe.generate(messages, [image], max_new_tokens=2).token_ids) == 2  # the caller's value wins

    # do_sample true: transformers' defaults where the file gives none (top_k 50)
    (target / "generation_config.json").write_text(json.dumps({**config, "do_sample": True, "temperature": 0.7,
                                                               "repetition_penalty": 1.1}))
    pipe = llava_next.load(target, progress=False)
    assert pipe.sampling_defaults == {"temperature": 0.7, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.1}
    a = pipe.generate(messages, [image], max_new_tokens=6, seed=3)
    b = pipe.generate(messages, [image], max_new_tokens=6, seed=3, temperature=0.7, top_k=50,
                      repetition_penalty=1.1)
    assert a.token_ids == b.token_ids
    assert pipe.generate(messages, [image], max_new_tokens=6, temperature=0,
                         repetition_penalty=1.0).token_ids == greedy.token_ids

    with pytest.raises(CheckpointError, match="generation_config.json: sampling settings that cannot work"):
        sampling_defaults({"do_sample": True, "temperature": -1})


def test_a_checkpoint_is_written_only_into_a_new_or_empty_directory(tiny, tmp_path, capsys):
    from llava_next.convert import convert
    from llava_next.pipeline import save_quantized

    source = tiny("mistral")
    capsys.readouterr()
    before = {p.name: p.stat().st_mtime_ns for p in source.iterdir()}
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    full = tmp_path / "full"
    full.mkdir()
    (full / "model.safetensors").write_bytes(b"someone else's weights")
    for out, says in ((a_file, "is a file"), (full, "already holds files")):
        code, _, err = run_cli(["quantize", "--model", source, "--quantize", "int8", "--out", out], capsys)
        assert code == 2 and f"the output {out} {says}" in err and err.count("\n") == 1
    assert a_file.read_text() == "mine" and (full / "model.safetensors").read_bytes() == b"someone else's weights"
    for command in (["quantize", "--quantize", "int8"], ["convert"]):  # under a file: named before the load
        code, _, err = run_cli([*command, "--model", source, "--out", a_file / "sub"], capsys)
        assert code == 2 and f"cannot write {a_file / 'sub'}: {a_file} is a file, not a directory" in err, err
    pipe = llava_next.load(source, progress=False, quantize="int8")
    with pytest.raises(CheckpointError, match="is the checkpoint being read"):
        save_quantized(pipe, source)
    with pytest.raises(CheckpointError, match="already holds files"):
        convert(Path(__file__).parent / "original" / "llava-v1.5-tiny", full)
    assert {p.name: p.stat().st_mtime_ns for p in source.iterdir()} == before
    # an empty directory, or none, is written
    (tmp_path / "empty").mkdir()
    assert run_cli(["quantize", "--model", source, "--quantize", "int8", "--out", tmp_path / "empty"], capsys)[0] == 0
    assert llava_next.load(tmp_path / "empty", progress=False).quantization["mode"] == "int8"


def test_data_and_recipe_files_that_are_not_what_they_should_be_are_one_line(tmp_path, capsys):
    picture = tmp_path / "p.png"
    smooth_image(32, 32).save(picture)
    for data, says in ((picture, "is not text (not UTF-8)"), (tmp_path, "is a directory")):
        code, _, err = run_cli(["eval", "--model", "demo", "--data", data], capsys)
        assert code == 2 and f"{data} {says}" in err and err.count("\n") == 1, err
    not_yaml = tmp_path / "notes.md"
    not_yaml.write_text("# Notes\n\nkey: value: another\n")
    a_list = tmp_path / "list.yaml"
    a_list.write_text("- model\n- data\n")
    bad_json = tmp_path / "r.json"
    bad_json.write_text('{"train": ')
    for recipe, says in ((not_yaml, "not valid YAML (line 3, column 11)"), (picture, "not a text file"),
                         (tmp_path / "none.yaml", "no such recipe file"), (tmp_path, "a directory"),
                         (a_list, "must be a mapping of keys (model:, data:, train:), not list"),
                         (bad_json, "not valid JSON (Expecting value: line 1 column 11")):
        code, _, err = run_cli(["train", "--config", recipe], capsys)
        assert code == 2 and f"recipe {recipe}: {says}" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("argv,says", [
    (["data", "synth", "--out", "x", "--n", "-3"], "argument --n: must be at least 1, got -3"),
    (["data", "synth", "--out", "x", "--n", "2", "--turns", "0"], "argument --turns: must be at least 1, got 0"),
    (["serve", "--port", "99999"], "argument --port: must be from 0 to 65535, got 99999"),
    (["serve", "--max-queue", "-1"], "argument --max-queue: must be at least 0, got -1"),
    (["eval", "--data", "d.json", "--limit", "0"], "argument --limit: must be at least 1, got 0"),
    (["generate", "--prompt", "Hi", "--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1, got 0"),
    (["generate", "--prompt", "Hi", "--max-new-tokens", "many"],
     "argument --max-new-tokens: 'many' is not a whole number"),
    (["info", "--max-image-pixels", "-5"], "argument --max-image-pixels: must be at least 1, got -5"),
    (["generate", "--prompt", "Hi", "--imge", "x.png"], "unrecognized arguments: --imge (did you mean --image?) x.png"),
    (["data", "synth", "--out", "x", "--n", "1", "--seeed=3"], "data synth: error: unrecognized arguments: --seeed=3 "
                                                               "(did you mean --seed?)"),
    (["info", "--json", "extra"], "info: error: unrecognized arguments: extra"),
    # another command's option: named as such, not "did you mean" the nearest spelling here (--conv-template)
    (["quantize", "--quantize", "int8", "--out", "x", "--compile"],
     "quantize: error: unrecognized arguments: --compile (an option of generate, chat, info, eval, serve, not of "
     "quantize)"),
    (["data", "synth", "--n", "2", "--model", "demo"], "the following arguments are required: --out; unrecognized "
     "arguments: --model (an option of generate, chat, info, convert, quantize, train, eval, serve, not of data "
     "synth) demo"),
    # a required option mistyped: argparse's own message would only say that it is missing
    (["generate", "--promt", "Hi"], "generate: error: the following arguments are required: --prompt; "
                                    "unrecognized arguments: --promt (did you mean --prompt?)"),
    (["data", "synth", "--n", "2", "--ot=x"], "the following arguments are required: --out; "
                                             "unrecognized arguments: --ot=x (did you mean --out?)"),
])
def test_counts_out_of_range_and_mistyped_flags_are_refused_by_name(argv, says, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    assert stopped.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_missing_required_option_names_only_what_argparse_could_not_parse(capsys):
    # an abbreviation argparse takes, an option's value that looks like an option: not "unrecognized"
    for argv in (["generate", "--max-new", "5"], ["generate", "--system=--be-brief"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert capsys.readouterr().err.splitlines()[-1] == \
            "llava-next generate: error: the following arguments are required: --prompt"


def test_a_sampling_flag_out_of_range_is_named_by_its_flag_before_the_model_loads(capsys):
    from llava_next.data.synth import generate
    from llava_next.sampling_params import GenerationError

    for flag, value, says in (("--temperature", "-1", "--temperature: temperature must be >= 0"),
                              ("--top-p", "1.5", "--top-p: top_p must be in (0, 1], got 1.5"),
                              ("--repetition-penalty", "0", "--repetition-penalty: repetition_penalty must be > 0")):
        # the model does not exist: the flag's error comes first, so nothing was loaded to find that out
        code, _, err = run_cli(["generate", "--model", "/no/such/model", "--prompt", "Hi", flag, value], capsys)
        assert code == 2 and says in err and err.count("\n") == 1, err
    with pytest.raises(GenerationError) as raised:
        llava_next.SamplingParams(top_k=-2).validate()
    assert raised.value.param == "top_k" and str(raised.value) == "top_k must be >= 0 (0 turns it off), got -2"
    with pytest.raises(LlavaError, match="n .images. and turns"):
        generate(Path("unused"), 0, seed=0)


def test_outputs_that_cannot_be_written_are_one_line_before_the_work(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a_file = tmp_path / "taken"
    a_file.write_text("mine")
    questions = tmp_path / "q"
    assert run_cli(["data", "synth", "--out", questions, "--n", "2"], capsys)[0] == 0
    written = (questions / "qa.json").read_bytes()
    code, _, err = run_cli(["data", "synth", "--out", questions, "--n", "3", "--seed", "7"], capsys)  # nothing replaced
    assert code == 2 and err == f"llava-next: error: {questions} already holds qa.json, captions.json, images/; give " \
                                "a new or empty --out (nothing in it is replaced)\n"
    assert (questions / "qa.json").read_bytes() == written and len(list((questions / "images").iterdir())) == 2
    for argv in (["data", "synth", "--out", a_file, "--n", "2"],
                 ["data", "tokenizer", "--data", questions / "qa.json", "--out", a_file],
                 ["train", "--model", "demo", "--data", questions / "qa.json", "--output-dir", a_file],
                 ["eval", "--model", "/no/such/model", "--task", "pope", "--data", "d", "--output", a_file]):
        code, _, err = run_cli(argv, capsys)
        assert code == 2 and err == f"llava-next: error: cannot write into {a_file}: it is a file; give a directory\n"
    # predictions: refused before the model loads (it does not exist: that would be the error otherwise)
    code, _, err = run_cli(["eval", "--model", "/no/such/model", "--data", questions / "qa.json", "--predictions",
                            questions], capsys)
    assert code == 2 and err == f"llava-next: error: cannot write {questions}: it is a directory; give a file name\n"
    assert a_file.read_text() == "mine"
    for argv, says in ((["eval", "--data", "d.json", "--output", "o"], "--output goes with --task"),
                       (["eval", "--task", "pope", "--data", "d", "--predictions", "p.jsonl"],
                        "--predictions goes without --task")):
        code, _, err = run_cli(argv, capsys)
        assert code == 2 and says in err and not (tmp_path / "o").exists()
    # and a file in a folder that is not there yet is written, the folder made
    code, out, _ = run_cli(["eval", "--model", "demo", "--data", questions / "qa.json", "--predictions",
                            tmp_path / "new" / "p.jsonl"], capsys)
    assert code == 0 and "all" in out and len((tmp_path / "new" / "p.jsonl").read_text().splitlines()) == 2


def test_a_dataset_that_is_neither_here_nor_on_the_hub_is_one_line(tmp_path, capsys, monkeypatch):
    datasets = pytest.importorskip("datasets")

    def unreachable(*args, **kwargs):  # what datasets raises offline, after its retries
        raise ConnectionError("Couldn't reach 'POPE/data' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["eval", "--model", "demo", "--task", "pope", "--data", "POPE/data"], capsys)
    assert code == 2 and "Traceback" not in err
    lines = err.splitlines()
    assert lines[0] == "POPE/data: no such file or directory here; reading it as a Hub dataset id"
    assert lines[1:] == ["llava-next: error: POPE/data: no such file or directory here, and reading it from the "
                         "Hugging Face Hub failed (ConnectionError: Couldn't reach 'POPE/data' on the Hub "
                         "(LocalEntryNotFoundError)). Check the path; or, on a machine with network access, run `hf "
                         "download POPE/data --repo-type dataset --local-dir DIR` and pass that DIR"]


def test_python_callers_mistakes_are_named(tmp_path):
    from llava_next.data.tokenizer import train_tokenizer
    from llava_next.prompt import PromptError

    pipe = llava_next.load("demo", progress=False)
    for role in ("usr", "tool", None):
        with pytest.raises(PromptError, match=f"message 0: role {role!r} is not one of system, user, assistant"):
            pipe.generate([{"role": role, "content": "What color is the circle?"}])
    chat = pipe.conversation()
    with pytest.raises(PromptError, match="images must be a list .one entry per image., not a str"):
        chat.ask("Again?", images="examples/shapes.png")
    with pytest.raises(PromptError, match="the question must be a string, not NoneType"):
        chat.ask(None)
    assert chat.messages == [] and chat.images == []  # nothing of a refused turn is kept
    # <image> typed in a question is where its image goes, as in generate()
    image = smooth_image(60, 40, seed=3)
    typed = chat.ask("<image>\nWhat color is it?", images=[image], max_new_tokens=4)
    assert typed.token_ids == pipe.generate([{"role": "user", "content": "<image>\nWhat color is it?"}], [image],
                                            max_new_tokens=4).token_ids
    chat = pipe.conversation()
    for option in ("prefix_cache", "compile"):
        with pytest.raises(LlavaError, match=f"{option} must be True or False, got 'no'"):
            llava_next.load("demo", progress=False, **{option: "no"})
    for quantize, says in ((None, "this load does not quantize"), ("int8", "int8 has no groups")):
        with pytest.raises(LlavaError, match=rf"group_size \(--group-size\) 32 applies to int4 quantization only; "
                                             rf"{says}"):
            llava_next.load("demo", progress=False, quantize=quantize, group_size=32)
    with pytest.raises(LlavaError, match="no model given: name a checkpoint directory, a Hub id or 'demo'"):
        llava_next.load("", progress=False)
    for model, what in (("demo", "model"), (tmp_path, "path")):  # a revision is not silently ignored
        with pytest.raises(LlavaError, match=f"a revision .'v2'. applies to Hub ids; .* is a local {what}: drop "
                                             "--revision .revision=. to read it as it is"):
            llava_next.load(model, progress=False, revision="v2")
    with pytest.raises(LlavaError, match="there is no text to train a tokenizer on"):
        train_tokenizer(["", "  "], tmp_path / "tok")


def test_serve_refuses_a_model_path_that_does_not_exist_before_it_listens(capsys, tmp_path, monkeypatch):
    pytest.importorskip("fastapi")
    import llava_next.serve.app as app_module

    monkeypatch.setattr(app_module, "serve", lambda settings: pytest.fail("listened"))
    for model in (str(tmp_path / "nodir"), "./nodir", "~/no/such/model", "C:/llava", "a/b/c"):
        assert cli.main(["serve", "--model", model]) == 2
        assert capsys.readouterr().err == (f"llava-next: error: {model!r} is neither an existing directory nor a Hub "
                                           "id of the form 'owner/name'\n")
    (tmp_path / "weights.safetensors").write_bytes(b"")
    for model, says in ((str(tmp_path / "weights.safetensors"), "is a file; point at the checkpoint's directory"),
                        (" ", "no model given")):
        assert cli.main(["serve", "--model", model]) == 2 and says in capsys.readouterr().err
    # a mistyped engine setting too, which every CPU load would refuse
    import llava_next.engine

    monkeypatch.setattr(llava_next.engine, "INT8_LAYOUT", "columns")
    assert cli.main(["serve", "--model", "demo", "--device", "cpu"]) == 2
    assert "LLAVA_NEXT_INT8_LAYOUT='columns' is not one of" in capsys.readouterr().err
