"""The hostile-input corpus (issue 6): what strangers and broken downloads hand the package, each with what must
come of it. tests/test_hostile.py runs every case, each under a time and a memory bound.

A case is one input run through one entry point: `load()`, the processor, `Pipeline.generate` / `stream`, or the
command line (`llava_next.cli.main`). What must come of it is one of
  Fails(pattern)    a package error (LlavaError) whose message matches `pattern`; from the command line exit code 2
                    and exactly one line on stderr (argparse's own rejections: its usage line and one error line);
  Succeeds(check)   an answer, which `check(result, world)` shows is the right one.
Never a traceback, a hang, a crash or silently wrong output.

The classes: options (every sampling and loading argument, NaN and infinity included), prompts (typed special
tokens, image counts, bytes and surrogates, control characters, a million characters, empty ones, the context
window exactly filled), checkpoints (copies of the tiny test checkpoints, broken one way each) and a few images.

The decisions the corpus asserts, where the code could reasonably do either:
  - `<image>` is the image placeholder wherever it is typed, in a raw prompt or in a chat message's text, as in
    transformers: typed, it takes the next image as an image item does, and with no image for it the error names
    the counts (the HTTP server, where strangers type, treats it as text: issue 8);
  - other special-token text typed in a message (`</s>`, `[INST]`, ...) is tokenized exactly as transformers does;
  - a prompt that fills the context window exactly leaves no room to answer: an error naming the context, as
    one token more is (not an empty answer that looks like a normal one);
  - a negative seed is a seed (PyTorch maps it into its range; same seed, same answer); one past 2**64 is an error;
  - an empty chat template, an empty message list, an empty raw prompt with no BOS are errors, not empty inputs.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

try:  # PLACEHOLDER: tests/hostile_images.py (written by another helper) provides the full set of hostile image
    import hostile_images  # files; until it lands, IMAGES below stands in with a handful. The lead wires them together.
except ImportError:
    hostile_images = None

# -- the checkpoints the cases run on ---------------------------------------------------------------------------------

GOOD = "vicuna"  # LLaVA-NeXT (anyres), a llama tokenizer that adds BOS, the vicuna template
SINGLE_TILE = "llava15"  # LLaVA 1.5: 576 tokens per image
NO_BOS = "qwen2"  # a tokenizer without BOS: an empty raw prompt is no tokens at all
SMALL_WINDOW = "small_window"  # GOOD with a 64-token context window
WINDOW = 64
MAX_NEW = 3  # tokens each generating case asks for, unless it is about max_new_tokens


@dataclass(frozen=True)
class Fails:
    match: str  # a regular expression searched, case-insensitively, in the error message
    also: tuple[type[BaseException], ...] = ()  # Python's own convention where it applies (TypeError: unknown keyword)


@dataclass(frozen=True)
class Succeeds:
    check: Callable[[Any, "World"], None] | None = None


@dataclass(frozen=True)
class Case:
    id: str
    via: str  # "load", "processor", "generate", "stream" or "cli"
    run: Callable[["World"], Any]
    expect: Fails | Succeeds


@dataclass
class CliResult:
    code: int
    out: str
    err: str


# -- the session's world: checkpoints (good and broken), images, pipelines, references -------------------------------


@dataclass
class World:
    """Everything the cases need, built once per session on first use."""

    tiny: Callable[[str], Path]  # conftest's tiny(name): a good tiny checkpoint
    root: Path  # where broken copies and images are written
    _pipes: dict[str, Any] = field(default_factory=dict)
    _refs: dict[str, Any] = field(default_factory=dict)

    def checkpoint(self, name: str) -> Path:
        if name not in VARIANTS:
            return self.tiny(name)
        out = self.root / "checkpoints" / name
        if not (out / ".built").exists():
            base, damage = VARIANTS[name]
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(self.tiny(base), out)
            damage(out)
            (out / ".built").write_text("")
        return out

    def pipe(self, name: str = GOOD):
        import llava_next

        if name not in self._pipes:
            self._pipes[name] = llava_next.load(self.checkpoint(name), progress=False)
        return self._pipes[name]

    def reference(self, name: str = GOOD):
        """transformers' processor for a good checkpoint."""
        from transformers import AutoProcessor

        if name not in self._refs:
            self._refs[name] = AutoProcessor.from_pretrained(self.checkpoint(name))
        return self._refs[name]

    def image(self, name: str) -> Path:
        out = self.root / "images"
        if not (out / ".built").exists():
            out.mkdir(parents=True, exist_ok=True)
            for image_name, write, _ in IMAGES:
                write(out / image_name)
            (out / ".built").write_text("")
        return out / name

    def cli(self, args: list[Any], stdin: str | None = None) -> CliResult:
        """The command line in this process. An exception that escapes main() is what a user would see as a
        traceback, so it propagates to the judge."""
        from llava_next import cli

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                if stdin is None:
                    code = cli.main([str(a) for a in args])
                else:
                    parsed = cli.build_parser().parse_args([str(a) for a in args])
                    code = cli.cmd_chat(parsed, stdin=io.StringIO(stdin), stdout=out)
            except SystemExit as e:  # argparse
                code = e.code if isinstance(e.code, int) else 1
        return CliResult(code, out.getvalue(), err.getvalue())


# -- checks for answers that must be right ----------------------------------------------------------------------------


def sound_generation(pipe, gen, max_new: int = MAX_NEW) -> None:
    """What every answer must satisfy: new tokens only, inside the vocabulary, text their decoding, a known finish."""
    from llava_next import Generation

    assert isinstance(gen, Generation), f"expected a Generation, got {type(gen).__name__}"
    vocab = pipe.config.text.vocab_size
    assert all(isinstance(t, int) and 0 <= t < vocab for t in gen.token_ids), gen.token_ids
    assert 1 <= len(gen.token_ids) <= max_new, f"{len(gen.token_ids)} tokens for max_new_tokens={max_new}"
    assert gen.finish_reason in ("stop", "length")
    eos = set(pipe.engine.eos_token_ids)
    body = gen.token_ids[:-1] if gen.token_ids[-1] in eos else gen.token_ids
    assert gen.text == pipe.processor.tokenizer.decode(body), (gen.text, body)
    assert gen.prompt_tokens + gen.completion_tokens <= pipe.config.text.max_position_embeddings


def answers(checkpoint: str = GOOD, max_new: int = MAX_NEW, more: Callable | None = None) -> Succeeds:
    def check(gen, world):
        sound_generation(world.pipe(checkpoint), gen, max_new)
        if more is not None:
            more(gen, world)
    return Succeeds(check)


def same_ids_as_transformers(text: str, checkpoint: str = GOOD) -> Callable:
    """The raw prompt was tokenized exactly as transformers' processor tokenizes it."""
    def check(gen, world):
        expected = world.reference(checkpoint)(text=text, return_tensors="pt")["input_ids"][0].tolist()
        ours = world.pipe(checkpoint).processor(text)["input_ids"][0].tolist()
        assert ours == expected, "our input ids differ from transformers'"
        assert gen.prompt_tokens == len(expected)
    return check


def equals_greedy(prompt: str, checkpoint: str = GOOD, max_new: int = MAX_NEW) -> Callable:
    """A setting that must reduce to greedy decoding (a vanishing temperature, top_k 1, a tiny top_p)."""
    def check(gen, world):
        greedy = world.pipe(checkpoint).generate(prompt, max_new_tokens=max_new)
        assert gen.token_ids == greedy.token_ids, f"{gen.token_ids} is not greedy's {greedy.token_ids}"
    return check


def cli_json_answer(checkpoint: str = GOOD, max_new: int = MAX_NEW) -> Succeeds:
    def check(result: CliResult, world):
        out = json.loads(result.out)
        assert out["token_ids"] and len(out["token_ids"]) <= max_new
        vocab = world.pipe(checkpoint).config.text.vocab_size
        assert all(0 <= t < vocab for t in out["token_ids"])
    return Succeeds(check)


# -- images (PLACEHOLDER until tests/hostile_images.py lands) ---------------------------------------------------------


def _png(width: int, height: int, seed: int = 0) -> bytes:
    from conftest import smooth_image

    buf = io.BytesIO()
    smooth_image(width, height, seed).save(buf, format="PNG")
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels, with almost no data: a decompression-bomb header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _writes(data: Callable[[], bytes]) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data())


def _tall_check(gen, world):
    """An extreme aspect ratio: the image costs exactly the tokens transformers gives it."""
    from PIL import Image

    path = world.image("tall_1x2000.png")
    pipe = world.pipe(GOOD)
    ref = world.reference(GOOD)(text="<image>", images=[Image.open(path)], return_tensors="pt")
    expected = int((ref["input_ids"] == pipe.config.image_token_id).sum())
    assert pipe.image_tokens(path) == expected, f"{pipe.image_tokens(path)} image tokens, transformers {expected}"


# name, writer, expectation for an image given to generate / the processor / the CLI
IMAGES: list[tuple[str, Callable[[Path], None], Fails | Succeeds]] = [
    ("small.png", _writes(lambda: _png(64, 48)), Succeeds()),
    ("zero_bytes.png", _writes(lambda: b""), Fails(r"empty|not an image|corrupt")),
    ("truncated.png", _writes(lambda: _png(500, 316)[:3000]), Fails(r"truncated|corrupt")),
    ("svg_named.png", _writes(lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>'),
     Fails(r"not an image")),
    ("directory.jpg", lambda path: path.mkdir(), Fails(r"no such image file|directory|not a file")),
    ("tall_1x2000.png", _writes(lambda: _png(1, 2000)), Succeeds(_tall_check)),
    ("bomb_header.png", _writes(lambda: _png_header_only(100_000, 100_000)), Fails(r"pixels|bomb")),
]


# -- broken checkpoints -----------------------------------------------------------------------------------------------


def _weights(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def damage(directory: Path) -> None:
        from safetensors.torch import load_file, save_file

        path = directory / "model.safetensors"
        tensors = load_file(str(path))
        edit(tensors)
        save_file(tensors, str(path), metadata={"format": "pt"})
    return damage


def _poke(name: str, value: float) -> Callable[[dict], None]:
    def edit(tensors):
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = value
    return edit


def _shrink_vocab(tensors, by: int = 16) -> None:
    for key in ("language_model.lm_head.weight", "language_model.model.embed_tokens.weight"):
        tensors[key] = tensors[key][:-by].clone()


def _config(*path: str, value: Any = None, delete: bool = False, file: str = "config.json") -> Callable[[Path], None]:
    """Set (or delete) one key of a JSON file, given as a path of keys."""
    def damage(directory: Path) -> None:
        d = json.loads((directory / file).read_text())
        target = d
        for key in path[:-1]:
            target = target[key]
        if delete:
            target.pop(path[-1], None)
        else:
            target[path[-1]] = value
        (directory / file).write_text(json.dumps(d))
    return damage


def _file(name: str, content: bytes | str | None) -> Callable[[Path], None]:
    """Replace a file's bytes (None: delete it)."""
    def damage(directory: Path) -> None:
        path = directory / name
        if content is None:
            path.unlink()
        else:
            path.write_bytes(content.encode() if isinstance(content, str) else content)
    return damage


def _both(*damages: Callable[[Path], None]) -> Callable[[Path], None]:
    def damage(directory: Path) -> None:
        for d in damages:
            d(directory)
    return damage


class _RunsCode:
    """Unpickling this calls a function (here a harmless one that would leave a mark)."""

    def __reduce__(self):
        return (Path.touch, (Path("/tmp/llava-next-pickle-ran-code"),))


def _bin_that_runs_code(directory: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(directory / "model.safetensors"))
    torch.save({**state, "payload": _RunsCode()}, directory / "pytorch_model.bin")
    (directory / "model.safetensors").unlink()


def _as_bin_shards(count: int) -> Callable[[Path], None]:
    """The weights as legacy PyTorch shards (pytorch_model-0000k-of-0000n.bin, or one pytorch_model.bin), no index."""
    def convert(directory: Path) -> None:
        from safetensors.torch import load_file

        state = load_file(str(directory / "model.safetensors"))
        names = sorted(state)
        for k in range(count):
            part = {n: state[n] for n in names[k::count]}
            torch.save(part, directory / (f"pytorch_model-{k + 1:05d}-of-{count:05d}.bin" if count > 1
                                          else "pytorch_model.bin"))
        (directory / "model.safetensors").unlink()
    return convert


def _truncate(name: str, keep: float) -> Callable[[Path], None]:
    def damage(directory: Path) -> None:
        data = (directory / name).read_bytes()
        (directory / name).write_bytes(data[: int(len(data) * keep)])
    return damage


def _legacy_template_file(content: bytes | str) -> Callable[[Path], None]:
    """chat_template.json (read before chat_template.jinja) with this content."""
    return _file("chat_template.json", content)


def _legacy_preprocessor_file(content: bytes | str) -> Callable[[Path], None]:
    """preprocessor_config.json as the only image-processor config (processor_config.json without its own)."""
    def damage(directory: Path) -> None:
        combined = json.loads((directory / "processor_config.json").read_text())
        combined.pop("image_processor", None)
        (directory / "processor_config.json").write_text(json.dumps(combined))
        _file("preprocessor_config.json", content)(directory)
    return damage


def _image_processor(key: str, value: Any) -> Callable[[Path], None]:
    return _config("image_processor", key, value=value, file="processor_config.json")


SIZE_FIELDS = [("text_config", "hidden_size"), ("text_config", "num_hidden_layers"),
               ("text_config", "num_attention_heads"), ("text_config", "num_key_value_heads"),
               ("text_config", "intermediate_size"), ("text_config", "vocab_size"),
               ("text_config", "max_position_embeddings"), ("text_config", "head_dim"),
               ("vision_config", "hidden_size"), ("vision_config", "num_hidden_layers"),
               ("vision_config", "num_attention_heads"), ("vision_config", "image_size"),
               ("vision_config", "patch_size"), ("vision_config", "intermediate_size")]

NOT_JSON = {"truncated": '{"model_type": "llava_n', "empty": "", "binary": b"\xff\xfe\x00garbage\x80",
            "not_an_object": "[1, 2, 3]"}

# name -> (the good checkpoint it copies, what breaks it); the expectation: one line from load() naming the problem
BROKEN: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "missing_weight": (GOOD, _weights(lambda t: t.pop("multi_modal_projector.linear_1.weight")),
                       r"missing.*multi_modal_projector\.linear_1\.weight"),
    "extra_weight": (GOOD, _weights(lambda t: t.update({"language_model.model.layers.7.extra.weight": torch.ones(2)})),
                     r"not in the model.*layers\.7\.extra"),
    "wrong_shape": (GOOD, _weights(lambda t: t.update({"multi_modal_projector.linear_2.weight": torch.ones(64, 63)})),
                    r"shape.*linear_2"),
    "nan_decoder_weight": (GOOD, _weights(_poke("language_model.model.layers.0.mlp.down_proj.weight", float("nan"))),
                           r"nan|inf|finite"),
    "inf_decoder_weight": (GOOD, _weights(_poke("language_model.model.layers.1.self_attn.q_proj.weight", float("inf"))),
                           r"nan|inf|finite"),
    "nan_vision_weight": (GOOD, _weights(_poke("vision_tower.encoder.layers.0.mlp.fc1.weight", float("nan"))),
                          r"nan|inf|finite"),
    "neg_inf_projector_bias": (GOOD, _weights(_poke("multi_modal_projector.linear_1.bias", float("-inf"))),
                               r"nan|inf|finite"),
    "nan_lm_head": (GOOD, _weights(_poke("language_model.lm_head.weight", float("nan"))), r"nan|inf|finite"),
    "vocab_smaller_than_tokenizer": (GOOD, _both(_weights(_shrink_vocab), _config("text_config", "vocab_size", value=614)),
                                     r"tokenizer has \d+ tokens.*614"),
    "vocab_smaller_config_only": (GOOD, _config("text_config", "vocab_size", value=614), r"vocab|tokenizer|614"),
    "unknown_model_type": (GOOD, _config("model_type", value="llava_onevision"), r"model_type.*llava_onevision"),
    "missing_model_type": (GOOD, _config("model_type", delete=True), r"model_type"),
    "unknown_text_model_type": (GOOD, _config("text_config", "model_type", value="gpt2"), r"model_type.*gpt2"),
    "unknown_vision_model_type": (GOOD, _config("vision_config", "model_type", value="siglip_vision_model"),
                                  r"model_type.*siglip"),
    "text_config_a_string": (GOOD, _config("text_config", value="llama"), r"text_config"),
    "unknown_rope_type": (GOOD, _config("text_config", "rope_parameters", value={"rope_type": "yarn", "factor": 2.0}),
                          r"rope.*yarn"),
    "zero_rope_theta": (GOOD, _config("text_config", "rope_parameters", value={"rope_type": "default", "rope_theta": 0}),
                        r"rope_theta"),
    "unknown_activation": (GOOD, _config("text_config", "hidden_act", value="relu"), r"hidden_act.*relu"),
    "feature_layer_out_of_range": (GOOD, _config("vision_feature_layer", value=-9), r"vision_feature_layer"),
    "feature_layer_a_string": (GOOD, _config("vision_feature_layer", value="penultimate"), r"vision_feature_layer"),
    "negative_image_token_index": (GOOD, _config("image_token_index", value=-1), r"image_token_index|<image>"),
    "pinpoints_zero": (GOOD, _config("image_grid_pinpoints", value=[[0, 0]]), r"image_grid_pinpoints"),
    "pinpoints_negative": (GOOD, _config("image_grid_pinpoints", value=[[-336, 672]]), r"image_grid_pinpoints"),
    "pinpoints_one_number": (GOOD, _config("image_grid_pinpoints", value=[[336]]), r"image_grid_pinpoints"),
    "pinpoints_not_tiles": (GOOD, _config("image_grid_pinpoints", value=[[300, 500]]), r"image_grid_pinpoints|336"),
    "pytorch_bin_that_runs_code": (GOOD, _bin_that_runs_code, r"pytorch_model\.bin.*plain data.*never run"),
    "pytorch_bin_truncated": (GOOD, _both(_as_bin_shards(1), _truncate("pytorch_model.bin", 0.5)),
                              r"pytorch_model\.bin: cannot be read as a PyTorch weight file .*truncated or damaged"),
    "html_renamed_safetensors": (GOOD, _file("model.safetensors", "<html><body>404 Not Found</body></html>"),
                                 r"model\.safetensors.*(corrupt|not a safetensors|invalid|header)"),
    "truncated_safetensors": (GOOD, _truncate("model.safetensors", 0.5), r"model\.safetensors.*(truncated|corrupt|incomplete)"),
    "empty_safetensors": (GOOD, _file("model.safetensors", b""), r"model\.safetensors"),
    "safetensors_header_claims_exabytes": (GOOD, _file("model.safetensors", struct.pack("<Q", 2**60) + b"{}"),
                                           r"model\.safetensors"),
    "no_weights": (GOOD, _file("model.safetensors", None), r"no model\.safetensors|safetensors"),
    "no_tokenizer_json": (GOOD, _file("tokenizer.json", None), r"tokenizer\.json"),
    "corrupt_tokenizer_json": (GOOD, _file("tokenizer.json", '{"version": "1.0", "model": {"type": "BPE"'),
                               r"tokenizer\.json"),
    "tokenizer_json_wrong_model": (GOOD, _file("tokenizer.json", '{"version": "1.0", "model": {"type": "Nope"}}'),
                                   r"tokenizer\.json"),
    "generation_config_eos_not_a_number": (GOOD, _config("eos_token_id", value="two", file="generation_config.json"),
                                           r"generation_config\.json.*eos_token_id"),
    "generation_config_eos_out_of_vocab": (GOOD, _config("eos_token_id", value=999999, file="generation_config.json"),
                                           r"generation_config\.json.*eos_token_id"),
    "generation_config_nan_temperature": (GOOD, _both(_config("do_sample", value=True, file="generation_config.json"),
                                                      _config("temperature", value=float("nan"), file="generation_config.json")),
                                          r"generation_config\.json.*temperature"),
    "chat_template_json_without_template": (GOOD, _legacy_template_file('{"template": "x"}'), r"chat_template\.json"),
    "chat_template_json_number": (GOOD, _legacy_template_file('{"chat_template": 5}'), r"chat_template\.json"),
    "chat_template_json_bad_jinja": (GOOD, _legacy_template_file('{"chat_template": "{% for m in messages %}"}'),
                                     r"chat_template\.json.*(parse|syntax|template)"),
    "shard_index_without_map": ("vicuna_sharded", _file("model.safetensors.index.json", '{"metadata": {}}'),
                                r"model\.safetensors\.index\.json.*weight_map"),
    "shard_index_map_a_list": ("vicuna_sharded", _file("model.safetensors.index.json", '{"weight_map": ["a"]}'),
                               r"model\.safetensors\.index\.json.*weight_map"),
    "shard_index_escapes_directory": ("vicuna_sharded", _config("weight_map", "image_newline", value="../../etc/passwd",
                                                                file="model.safetensors.index.json"),
                                      r"model\.safetensors\.index\.json|passwd|outside"),
    "image_std_zero": (GOOD, _image_processor("image_std", [0.0, 0.0, 0.0]), r"image_std"),
    "image_mean_one_number": (GOOD, _image_processor("image_mean", [0.5]), r"image_mean"),
    "crop_size_negative": (GOOD, _image_processor("crop_size", {"height": -336, "width": -336}), r"crop_size|tile|336"),
    "size_a_string": (GOOD, _image_processor("size", "big"), r"size"),
    "image_processor_a_string": (GOOD, _config("image_processor", value="clip", file="processor_config.json"),
                                 r"processor_config\.json.*image_processor"),
}
for _section, _key in SIZE_FIELDS:
    for _value in (0, -1):
        BROKEN[f"{_section}_{_key}_{'zero' if _value == 0 else 'negative'}"] = (
            GOOD, _config(_section, _key, value=_value), rf"{_key}")
for _name, _content in NOT_JSON.items():
    for _file_name, _make in (("config.json", None), ("tokenizer_config.json", None),
                              ("generation_config.json", None), ("processor_config.json", None),
                              ("chat_template.json", _legacy_template_file),
                              ("preprocessor_config.json", _legacy_preprocessor_file)):
        damage = _make(_content) if _make else _file(_file_name, _content)
        BROKEN[f"{_file_name.split('.')[0]}_json_{_name}"] = (GOOD, damage, re.escape(_file_name))
    BROKEN[f"shard_index_{_name}"] = ("vicuna_sharded", _file("model.safetensors.index.json", _content),
                                      r"model\.safetensors\.index\.json")

# checkpoints that are not broken, only different: a 64-token context window for the context-length cases
VARIANTS: dict[str, tuple[str, Callable[[Path], None]]] = {
    SMALL_WINDOW: (GOOD, _config("text_config", "max_position_embeddings", value=WINDOW)),
    "bin_shards_without_index": (GOOD, _as_bin_shards(2)),
    **{f"broken_{name}": (base, damage) for name, (base, damage, _) in BROKEN.items()},
}


# -- prompts ----------------------------------------------------------------------------------------------------------


def text_of_length(tokenizer, n: int) -> str:
    """A raw prompt of exactly n tokens (its BOS included)."""
    for k in range(n + 1):
        for tail in ("", " a", "."):
            text = "cat " * k + tail
            if len(tokenizer.encode(text)) == n:
                return text
    raise AssertionError(f"no prompt of exactly {n} tokens")


def user(text: str, n_images: int = 0) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


def batch_equals_singles(prompts, images) -> Callable:
    def check(gens, world):
        pipe = world.pipe(GOOD)
        assert isinstance(gens, list) and len(gens) == len(prompts)
        for gen, prompt, ims in zip(gens, prompts, images):
            single = pipe.generate(prompt, [world.image(i) for i in ims], max_new_tokens=MAX_NEW)
            assert gen.token_ids == single.token_ids
    return check


# -- the cases --------------------------------------------------------------------------------------------------------

CASES: list[Case] = []


def case(id: str, via: str, run: Callable[[World], Any], expect: Fails | Succeeds) -> None:
    CASES.append(Case(id, via, run, expect))


def generate(id: str, expect, prompt: Any = "USER: Hi ASSISTANT:", images: tuple = (), checkpoint: str = GOOD,
             stream: bool = False, **options) -> None:
    """One generate() case (or stream(), drained), MAX_NEW tokens unless the options say otherwise."""
    options.setdefault("max_new_tokens", MAX_NEW)

    def run(world):
        pipe = world.pipe(checkpoint)
        # a str is one image given where a list belongs: passed as it is, a path string
        ims = str(world.image(images)) if isinstance(images, str) else \
            [world.image(i) if isinstance(i, str) else i for i in images]
        p = prompt(world) if callable(prompt) else prompt
        if stream:
            s = pipe.stream(p, ims, **options)
            "".join(s)
            return s.generation
        return pipe.generate(p, ims, **options)

    case(id, "stream" if stream else "generate", run, expect)


def cli(id: str, expect, *args: Any, checkpoint: str = GOOD, image: str | None = None, prompt: str = "Describe.",
        stdin: str | None = None) -> None:
    def run(world):
        head = ["chat" if stdin is not None else "generate", "--model", world.checkpoint(checkpoint)]
        if stdin is None:
            head += ["--prompt", prompt, "--max-new-tokens", MAX_NEW, "--json"]
        else:
            head += ["--max-new-tokens", MAX_NEW]
        if image is not None:
            head += ["--image", world.image(image)]
        # a later flag overrides an earlier one: the case's own --max-new-tokens wins
        return world.cli(head + list(args), stdin)

    case(id, "cli", run, expect)


def load_case(id: str, expect, checkpoint: str = GOOD, model: str | None = None, **options) -> None:
    """load() of a corpus checkpoint, or of `model` given as it is (a path or Hub id that is no checkpoint)."""
    def run(world):
        import llava_next

        return llava_next.load(model if model is not None else world.checkpoint(checkpoint), progress=False, **options)

    case(id, "load", run, expect)


def processor_case(id: str, expect, text: Any, images: tuple = (), **options) -> None:
    def run(world):
        ims = [world.image(i) if isinstance(i, str) else i for i in images]
        return world.pipe(GOOD).processor(text, ims, **options)

    case(id, "processor", run, expect)


def loaded(check: Callable | None = None) -> Succeeds:
    def verify(pipe, world):
        gen = pipe.generate("USER: Hi ASSISTANT:", max_new_tokens=MAX_NEW)
        sound_generation(pipe, gen)
        if check is not None:
            check(pipe, world)
    return Succeeds(verify)


# options: sampling, through generate() and the command line ------------------------------------------------------

PROMPT = "USER: Hi ASSISTANT:"
SAMPLING_BAD = [
    # (name, option, value, CLI spelling or None when argparse cannot even express it)
    ("temperature_nan", "temperature", float("nan"), "nan"),
    ("temperature_inf", "temperature", float("inf"), "inf"),
    ("temperature_neg_inf", "temperature", float("-inf"), "-inf"),
    ("temperature_negative", "temperature", -0.5, "-0.5"),
    ("temperature_string", "temperature", "0.7", None),
    ("top_p_nan", "top_p", float("nan"), "nan"),
    ("top_p_inf", "top_p", float("inf"), "inf"),
    ("top_p_zero", "top_p", 0.0, "0"),
    ("top_p_above_one", "top_p", 1.5, "1.5"),
    ("top_p_negative", "top_p", -0.1, "-0.1"),
    ("top_k_negative", "top_k", -1, "-1"),
    ("top_k_fraction", "top_k", 2.5, None),
    ("top_k_nan", "top_k", float("nan"), None),
    ("max_new_tokens_zero", "max_new_tokens", 0, "0"),
    ("max_new_tokens_negative", "max_new_tokens", -1, "-1"),
    ("max_new_tokens_fraction", "max_new_tokens", 1.5, None),
    ("max_new_tokens_string", "max_new_tokens", "5", None),
    ("max_new_tokens_inf", "max_new_tokens", float("inf"), None),
    ("repetition_penalty_zero", "repetition_penalty", 0.0, "0"),
    ("repetition_penalty_negative", "repetition_penalty", -1.0, "-1"),
    ("repetition_penalty_nan", "repetition_penalty", float("nan"), "nan"),
    ("repetition_penalty_inf", "repetition_penalty", float("inf"), "inf"),
    ("seed_above_2_64", "seed", 2**64, str(2**64)),
    ("seed_string", "seed", "abc", None),
    ("seed_fraction", "seed", 1.5, None),
    ("stop_empty", "stop", "", ""),
    ("stop_empty_in_list", "stop", ["ok", ""], None),
    ("stop_not_a_string", "stop", [3], None),
]
for name, option, value, spelled in SAMPLING_BAD:
    # temperature > 0 where the option only matters when sampling
    extra = {"temperature": 1.0, "seed": 0} if option in ("top_p", "top_k", "seed") else {}
    extra = {**extra, option: value}
    generate(f"options-generate-{name}", Fails(option), PROMPT, **extra)
    if spelled is not None:
        flags = ["--temperature", "1", "--seed", "0"] if option in ("top_p", "top_k") else \
            ["--temperature", "1"] if option == "seed" else []
        # the command line names the flag
        cli(f"options-cli-{name}", Fails(f"--{option.replace('_', '-')}"), *flags, f"--{option.replace('_', '-')}",
            spelled)
for name in ("temperature_nan", "top_p_nan", "stop_empty", "max_new_tokens_zero"):
    _, option, value, _ = next(s for s in SAMPLING_BAD if s[0] == name)
    generate(f"options-stream-{name}", Fails(option), PROMPT, stream=True, **{option: value})
generate("options-generate-unknown_option", Fails(r"temprature", also=(TypeError,)), PROMPT, temprature=0.5)

# settings that are odd but valid, and what they must equal
generate("options-generate-temperature_tiny_is_greedy", answers(more=equals_greedy(PROMPT)), PROMPT,
         temperature=1e-30, seed=1)
# the smallest float: logits divided by it overflow to infinity in float32, which must still mean "greedy"
generate("options-generate-temperature_denormal_is_greedy", answers(more=equals_greedy(PROMPT)), PROMPT,
         temperature=5e-324, seed=1)
generate("options-generate-temperature_huge", answers(), PROMPT, temperature=1e30, seed=1)
generate("options-generate-top_k_1_is_greedy", answers(more=equals_greedy(PROMPT)), PROMPT, temperature=1.0, top_k=1,
         seed=2)
generate("options-generate-top_k_huge", answers(), PROMPT, temperature=1.0, top_k=10**9, seed=2)
generate("options-generate-top_p_tiny_is_greedy", answers(more=equals_greedy(PROMPT)), PROMPT, temperature=1.0,
         top_p=1e-9, seed=3)


def _same_twice(**options) -> Callable:
    def check(gen, world):
        again = world.pipe(GOOD).generate(PROMPT, max_new_tokens=MAX_NEW, **options)
        assert gen.token_ids == again.token_ids, "the same seed gave different tokens"
    return check


for name, seed in (("negative", -1), ("most_negative", -(2**63)), ("largest", 2**64 - 1)):
    generate(f"options-generate-seed_{name}", answers(more=_same_twice(temperature=1.0, seed=seed)), PROMPT,
             temperature=1.0, seed=seed)
cli("options-cli-seed_negative", cli_json_answer(), "--temperature", "1", "--seed", "-1")
generate("options-generate-stop_nul", answers(), PROMPT, stop="\x00")
generate("options-generate-stop_long", answers(), PROMPT, stop="x" * 10_000)
generate("options-generate-max_new_tokens_huge", answers(SMALL_WINDOW, max_new=WINDOW), PROMPT,
         checkpoint=SMALL_WINDOW, max_new_tokens=10**12)
generate("options-generate-max_new_tokens_2_63", answers(SMALL_WINDOW, max_new=WINDOW), PROMPT,
         checkpoint=SMALL_WINDOW, max_new_tokens=2**63)
cli("options-cli-max_new_tokens_huge", cli_json_answer(SMALL_WINDOW, max_new=WINDOW), "--max-new-tokens",
    str(10**12), checkpoint=SMALL_WINDOW)
cli("options-cli-max_new_tokens_not_a_number", Fails(r"max-new-tokens.*'lots' is not a whole number"),
    "--max-new-tokens", "lots")
cli("options-cli-temperature_not_a_number", Fails(r"temperature.*invalid float"), "--temperature", "hot")

# options: loading, through load() and the command line --------------------------------------------------------------

DEVICES_BAD = [("nonsense", "nonsense"), ("tpu", "tpu"), ("meta", "meta"), ("empty", ""), ("cuda_99", "cuda:99"),
               ("cpu_minus_one", "cpu:-1"), ("spaces", " cpu ")]
if not torch.cuda.is_available():
    DEVICES_BAD.append(("cuda_without_gpu", "cuda"))
for name, device in DEVICES_BAD:
    load_case(f"options-load-device_{name}", Fails(r"device"), device=device)
    cli(f"options-cli-device_{name}", Fails(r"device"), "--device", device)
load_case("options-load-device_an_int", Fails(r"device"), device=99)
load_case("options-load-device_cpu_0", loaded(), device="cpu:0")
for name, dtype in (("float64", "float64"), ("int8", "int8"), ("nonsense", "fp13"), ("torch_int64", torch.int64),
                    ("torch_bool", torch.bool)):
    load_case(f"options-load-dtype_{name}", Fails(r"dtype"), dtype=dtype)
cli("options-cli-dtype_float64", Fails(r"dtype.*invalid choice"), "--dtype", "float64")
load_case("options-load-dtype_bfloat16", loaded(), dtype="bfloat16")
for name, value in (("zero", 0), ("negative", -1)):
    load_case(f"options-load-max_image_pixels_{name}", Fails(r"max_image_pixels"), max_image_pixels=value)
    cli(f"options-cli-max_image_pixels_{name}", Fails(r"max.image.pixels"), "--max-image-pixels", value,
        image="small.png")
load_case("options-load-max_image_pixels_string", Fails(r"max_image_pixels"), max_image_pixels="many")


def _tiny_pixel_limit(world):
    import llava_next

    pipe = llava_next.load(world.checkpoint(GOOD), progress=False, max_image_pixels=1)
    return pipe.generate("USER: <image>\nHi ASSISTANT:", [world.image("small.png")], max_new_tokens=MAX_NEW)


case("options-generate-max_image_pixels_one_refuses_the_image", "generate", _tiny_pixel_limit, Fails(r"pixels.*limit"))
load_case("options-load-quantize_unknown", Fails(r"quantize"), quantize="int3")
cli("options-cli-quantize_unknown", Fails(r"quantize.*invalid choice"), "--quantize", "int3")
for name, value in (("zero", 0), ("negative", -128), ("not_dividing", 7)):
    load_case(f"options-load-group_size_{name}", Fails(r"group_size"), quantize="int4", group_size=value)
load_case("options-load-image_cache_bytes_negative", Fails(r"image_cache_bytes"), image_cache_bytes=-1)
load_case("options-load-chat_template_empty", Fails(r"chat.template"), chat_template="")
load_case("options-load-chat_template_syntax_error", Fails(r"chat template.*parse"), chat_template="{% if %}")
load_case("options-load-chat_template_not_a_string", Fails(r"chat.template"), chat_template=["{{ x }}"])
load_case("options-load-model_missing_dir", Fails(r"neither an existing directory nor a Hub id"), model="/no/such/dir")
load_case("options-load-model_a_file", Fails(r"is a file"), model="/etc/hostname")
load_case("options-load-model_without_config", Fails(r"no config\.json"), model="/tmp")
load_case("options-load-model_three_slashes", Fails(r"Hub id"), model="a/b/c")
cli("options-cli-model_missing_dir", Fails(r"neither an existing directory nor a Hub id"), "--model", "/no/such/dir")
cli("options-cli-model_empty", Fails(r"config\.json|directory"), "--model", "")
cli("options-cli-image_missing", Fails(r"no such image file"), image="missing.png")
cli("options-cli-no_prompt", Fails(r"--prompt"), "--prompt")

# prompts ---------------------------------------------------------------------------------------------------------

generate("prompts-generate-raw_placeholder_without_image", Fails(r"1 <image> placeholder but 0 images"), "USER: <image> Hi")
generate("prompts-generate-raw_two_placeholders_one_image", Fails(r"2 <image> placeholders but 1 image"),
         "USER: <image><image> Hi ASSISTANT:", ("small.png",))
generate("prompts-generate-raw_no_placeholder_one_image", Fails(r"0 <image> placeholders but 1 image"),
         "USER: Hi ASSISTANT:", ("small.png",))
generate("prompts-generate-raw_placeholder_is_the_image", answers(), "USER: <image>\nHi ASSISTANT:", ("small.png",))
generate("prompts-generate-messages_two_items_one_image",
         Fails(r"2 image places without an image of its own .* but 1 image was given"), user("Hi", 2), ("small.png",))
generate("prompts-generate-messages_no_item_one_image",
         Fails(r"0 image places .* but 1 image was given"), user("Hi"), ("small.png",))
typed = user("What does <image> mean?")
generate("prompts-generate-messages_typed_image_token_is_a_placeholder",
         Fails(r"1 image place without .*<image> typed in the text\) but 0 images were given"), typed)
typed_with_image = user("Compare this with <image>, the tag.", 1)
generate("prompts-generate-messages_typed_image_token_beside_an_image",
         Fails(r"2 image places .* but 1 image was given"), typed_with_image, ("small.png",))
generate("prompts-generate-messages_typed_image_token_takes_an_image", answers(), user("<image>\nWhat is this?"),
         ("small.png",))
generate("prompts-generate-messages_typed_image_token_and_an_inline_image", Fails(r"typed in their text and images "
         r"given inline"), lambda world: [{"role": "user", "content": [
             {"type": "image", "image": str(world.image("small.png"))}, {"type": "text", "text": "And <image>?"}]}],
         ("small.png",))
cli("prompts-cli-typed_image_token_is_a_placeholder", Fails(r"1 image place without .* but 0 images were given"),
    prompt="What does <image> mean?")
cli("prompts-cli-typed_image_token_takes_the_image", cli_json_answer(), image="small.png", prompt="<image>\nWhat?")
cli("prompts-cli-typed_image_tokens_and_one_image", Fails(r"2 image places .* but 1 image was given"),
    image="small.png", prompt="<image> and <image>?")

def _chat_error(result: CliResult, pattern: str) -> None:
    """chat prints a bad line's error as one line on stdout and goes on (exit code 0)."""
    assert re.search(rf"^error: .*{pattern}", result.out, re.MULTILINE), f"chat printed {result.out[:300]!r}"


def _chat_answered(result: CliResult, world) -> None:
    """`llava-next chat` answered the line (an error is printed on stdout as "error: ...", and chat goes on)."""
    assert result.out.strip() and not result.out.startswith("error:"), f"chat printed {result.out[:300]!r}"


cli("prompts-chat-typed_image_token_is_an_error_line", Succeeds(lambda r, w: _chat_error(r, r"1 image place")),
    stdin="what is <image>?\n")
cli("prompts-chat-million_chars_is_an_error_line", Succeeds(lambda r, w: _chat_error(r, r"context window")),
    stdin="word " * 200_000 + "\n")
for name, text in (("eos", "stop here </s> and go on"), ("bos", "<s> again"), ("inst", "[INST] obey [/INST]"),
                   ("pad", "<pad><pad>"), ("unk", "<unk>")):
    raw = f"USER: {text} ASSISTANT:"
    generate(f"prompts-generate-raw_special_text_{name}", answers(more=same_ids_as_transformers(raw)), raw)
generate("prompts-generate-raw_chatml_text_on_qwen", answers(NO_BOS, more=same_ids_as_transformers(
    "<|im_start|>user\n<|im_end|> hi<|im_end|>\n<|im_start|>assistant\n", NO_BOS)),
    "<|im_start|>user\n<|im_end|> hi<|im_end|>\n<|im_start|>assistant\n", checkpoint=NO_BOS)
for name, text in (("control_characters", "USER: \x00\x01\x07\x1b[2J\x7f\r\n\t ASSISTANT:"),
                   ("bidi_and_zero_width", "USER: \u202eevil\u202c \u200b\ufeff\u2028 ASSISTANT:"),
                   ("whitespace_only", "   \n\t  \n"),
                   ("replacement_chars", "USER: \ufffd\ufffd ASSISTANT:"),
                   ("emoji_and_cjk", "USER: 😀👍🏽 北京 ASSISTANT:")):
    generate(f"prompts-generate-raw_{name}", answers(more=same_ids_as_transformers(text)), text)
generate("prompts-generate-raw_empty_with_bos", answers(more=same_ids_as_transformers("")), "")
generate("prompts-generate-raw_empty_without_bos", Fails(r"empty"), "", checkpoint=NO_BOS)
generate("prompts-generate-messages_empty_text", answers(), user(""))
generate("prompts-generate-messages_whitespace_text", answers(), user(" \n\t "))
generate("prompts-generate-messages_control_characters", answers(), user("\x00\x1b[31mred\x1b[0m\x08"))
generate("prompts-generate-messages_empty_list", Fails(r"message"), [])
generate("prompts-generate-messages_a_dict", Fails(r"list"), {"role": "user", "content": "Hi"})
generate("prompts-generate-messages_content_a_number", Fails(r"content"), [{"role": "user", "content": 5}])
generate("prompts-generate-messages_content_item_a_string", Fails(r"content item"), [{"role": "user", "content": ["Hi"]}])
generate("prompts-generate-messages_unknown_item_type", Fails(r"video"), [{"role": "user", "content": [{"type": "video"}]}])
generate("prompts-generate-messages_inline_image_missing_file", Fails(r"no such image file"),
         [{"role": "user", "content": [{"type": "image", "image": "/no/such.png"}, {"type": "text", "text": "Hi"}]}])
generate("prompts-generate-messages_inline_image_url", Fails(r"URL"),
         [{"role": "user", "content": [{"type": "image", "url": "http://169.254.169.254/x.png"},
                                       {"type": "text", "text": "Hi"}]}])
generate("prompts-generate-prompt_bytes", Fails(r"bytes|str"), b"USER: Hi ASSISTANT:")
generate("prompts-generate-prompt_invalid_utf8_bytes", Fails(r"bytes|str|UTF-8"), b"\xff\xfe\xc3\x28")
generate("prompts-generate-prompt_none", Fails(r"prompt|messages|None"), None)
generate("prompts-generate-prompt_a_number", Fails(r"prompt|messages|int"), 42)
generate("prompts-generate-raw_lone_surrogate", Fails(r"surrogate|UTF-8|encod"), "USER: \ud800 ASSISTANT:")
generate("prompts-generate-messages_lone_surrogate", Fails(r"surrogate|UTF-8|encod"), user("bad \udcff byte"))
cli("prompts-cli-prompt_undecodable_argv", Fails(r"surrogate|UTF-8|encod"), prompt="caf\udce9")
generate("prompts-generate-images_a_path_not_a_list", Fails(r"list"), "USER: <image> Hi", "small.png")
generate("prompts-generate-images_none_item", Fails(r"image 0|NoneType|image"), "USER: <image> Hi", (None,))
generate("prompts-generate-images_a_number", Fails(r"image 0.*int|expected"), "USER: <image> Hi", (123,))
generate("prompts-generate-batch_images_wrong_length", Fails(r"one list of images per prompt"),
         ["USER: <image> A", "USER: B"], [["small.png"]])
batch = ["USER: <image>\nA ASSISTANT:", "USER: Hello there ASSISTANT:"]


def _batch_run(world):
    return world.pipe(GOOD).generate(batch, [[world.image("small.png")], []], max_new_tokens=MAX_NEW)


case("prompts-generate-batch_equals_singles", "generate", _batch_run,
     Succeeds(batch_equals_singles(batch, [["small.png"], []])))

MILLION = 1_000_000
for name, text in (("words", "word " * (MILLION // 5)), ("one_letter", "a" * MILLION),
                   ("emoji", "😀" * (MILLION // 4)), ("newlines", "\n" * MILLION),
                   ("placeholders", "<image>" * (MILLION // 7))):
    message = r"placeholder" if name == "placeholders" else r"context window"
    generate(f"prompts-generate-million_chars_{name}", Fails(message), text)
generate("prompts-generate-million_chars_in_a_message", Fails(r"context window"), user("word " * (MILLION // 5)))
cli("prompts-cli-million_chars", Fails(r"context window"), prompt="word " * (MILLION // 5))
generate("prompts-stream-million_chars", Fails(r"context window"), "word " * (MILLION // 5), stream=True)
processor_case("prompts-processor-million_chars", Fails(r"context window"), "word " * (MILLION // 5))


def _of_length(n: int) -> Callable[[World], str]:
    return lambda world: text_of_length(world.pipe(SMALL_WINDOW).processor.tokenizer, n)


def _one_token_at_the_end(gen, world):
    assert gen.completion_tokens == 1 and gen.prompt_tokens == WINDOW - 1, (gen.prompt_tokens, gen.completion_tokens)


generate("prompts-generate-context_one_short", answers(SMALL_WINDOW, more=_one_token_at_the_end), _of_length(WINDOW - 1),
         checkpoint=SMALL_WINDOW, max_new_tokens=5)
generate("prompts-generate-context_exactly_full", Fails(r"context"), _of_length(WINDOW), checkpoint=SMALL_WINDOW)
generate("prompts-generate-context_one_over", Fails(r"context window"), _of_length(WINDOW + 1), checkpoint=SMALL_WINDOW)
generate("prompts-stream-context_exactly_full", Fails(r"context"), _of_length(WINDOW), checkpoint=SMALL_WINDOW, stream=True)
generate("prompts-generate-context_image_too_big_for_window", Fails(r"context window.*tokens"),
         "USER: <image> Hi", ("small.png",), checkpoint=SMALL_WINDOW)

processor_case("prompts-processor-text_none", Fails(r"text"), None)
processor_case("prompts-processor-text_empty_list", Fails(r"text"), [])
processor_case("prompts-processor-text_numbers", Fails(r"text"), [1, 2])
processor_case("prompts-processor-text_bytes", Fails(r"text|bytes|str"), b"hi")
processor_case("prompts-processor-placeholder_without_image", Fails(r"placeholder"), "<image>")
processor_case("prompts-processor-image_without_placeholder", Fails(r"placeholder"), "hi", ("small.png",))
processor_case("prompts-processor-padding_side", Fails(r"padding_side"), ["a", "bb"], padding_side="middle")
processor_case("prompts-processor-lone_surrogate", Fails(r"surrogate|UTF-8|encod"), "\udcff")


def _chat_text_is_text(result, world):
    assert "What does <image> mean?" in result, result


case("prompts-processor-apply_chat_template_keeps_typed_text", "processor",
     lambda w: w.pipe(GOOD).processor.apply_chat_template(typed), Succeeds(_chat_text_is_text))

# images (PLACEHOLDER set; tests/hostile_images.py will supply the full one) --------------------------------------

for image_name, _, expect in IMAGES:
    stem = image_name.replace(".", "_")
    generate(f"images-generate-{stem}", expect if isinstance(expect, Fails) else answers(more=expect.check),
             "USER: <image>\nHi ASSISTANT:", (image_name,))
    processor_case(f"images-processor-{stem}", expect if isinstance(expect, Fails) else Succeeds(),
                   "USER: <image>\nHi ASSISTANT:", (image_name,))
    cli(f"images-cli-{stem}", expect if isinstance(expect, Fails) else cli_json_answer(), image=image_name)

# checkpoints: every broken one through load(), the command line, and (for the weights) generate ------------------

NON_FINITE = {"nan_decoder_weight", "inf_decoder_weight", "nan_vision_weight", "neg_inf_projector_bias", "nan_lm_head"}


def _load_and_answer(name: str) -> Callable[[World], Any]:
    """load() and one answer with an image: non-finite weights must be reported by one or the other."""
    def run(world):
        import llava_next

        pipe = llava_next.load(world.checkpoint(f"broken_{name}"), progress=False)
        return pipe.generate("USER: <image>\nHi ASSISTANT:", [world.image("small.png")], max_new_tokens=MAX_NEW)
    return run


for name, (_, _, message) in BROKEN.items():
    if name in NON_FINITE:
        case(f"checkpoints-generate-{name}", "generate", _load_and_answer(name), Fails(message))
    else:
        load_case(f"checkpoints-load-{name}", Fails(message), checkpoint=f"broken_{name}")
    cli(f"checkpoints-cli-{name}", Fails(message), checkpoint=f"broken_{name}", image="small.png")


def _same_answer_as_the_safetensors(gen, world) -> None:
    expected = world.pipe(GOOD).generate("USER: <image>\nHi ASSISTANT:", [world.image("small.png")],
                                         max_new_tokens=MAX_NEW)
    assert gen.token_ids == expected.token_ids


# legacy .bin shards without their index are read, as *.safetensors shards without one are
generate("checkpoints-generate-bin_shards_without_index", Succeeds(_same_answer_as_the_safetensors),
         "USER: <image>\nHi ASSISTANT:", ("small.png",), checkpoint="bin_shards_without_index")


def _unique(cases: list[Case]) -> list[Case]:
    ids = [c.id for c in cases]
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    assert not duplicated, f"duplicated case ids: {duplicated}"
    return cases


CASES = _unique(CASES)
