"""A training run's recipe: typed, read from YAML or JSON whose keys mirror these dataclasses, overridable by flags.

    model:  where the weights come from (init: llava | parts | scratch) and the chat template
    data:   the LLaVA-format files, the format (plain for stage 1, chat for stage 2) and the limits
    train:  what trains and how fast, batching, schedule, precision, checkpoints

The defaults are the published LLaVA-NeXT recipe's stage 2 where it says (vision tower 2e-6 while the rest trains
at 1e-5 to 2e-5; stage 1 is the projector alone at 1e-3).
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .build import ScratchSizes
from ..errors import LlavaError
from ..load_options import DTYPE_NAMES
from .lora import LoraConfig

PARTS = ("projector", "vision", "language")


class RecipeError(LlavaError, ValueError):
    """A recipe that cannot run."""


@dataclass
class ModelRecipe:
    init: str = "llava"  # "llava": continue from a LLaVA checkpoint; "parts": CLIP + language model; "scratch"
    path: str | None = None  # init=llava: checkpoint directory, Hub id or "demo"
    vision: str | None = None  # init=parts: a CLIP checkpoint (e.g. openai/clip-vit-large-patch14-336)
    language: str | None = None  # init=parts: a llama / mistral / qwen2 checkpoint
    tokenizer: str | None = None  # init=scratch: directory with tokenizer.json (llava-next data tokenizer)
    scratch: ScratchSizes = field(default_factory=ScratchSizes)  # init=scratch: the sizes
    chat_template: str | None = None  # built-in template name, a .jinja file, or the template itself


@dataclass
class DataRecipe:
    path: list[str] = field(default_factory=list)  # LLaVA JSON / JSON-lines files
    image_folder: str | None = None  # image paths are relative to this (default: each file's folder)
    format: str = "chat"  # "plain" (stage 1 captions) or "chat" (stage 2 conversations)
    max_length: int = 4096  # tokens, image tokens included; longer samples are dropped, never cut
    max_bad_fraction: float = 0.01  # fail when more records than this are unusable


@dataclass
class TrainRecipe:
    output_dir: str = "runs/llava-next"
    tune: list[str] = field(default_factory=lambda: ["projector", "vision", "language"])
    lr: dict[str, float] = field(default_factory=lambda: {"projector": 1e-5, "vision": 2e-6, "language": 1e-5})
    lora: LoraConfig = field(default_factory=LoraConfig)
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 4  # samples per process per micro-step
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0  # the cosine decays to lr * this
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    precision: str = "auto"  # "auto" (bf16 autocast on GPUs that have it, else fp32), "bf16", "fp32"
    gradient_checkpointing: bool = False
    group_by_modality_length: bool = True
    seed: int = 0
    save_every: int = 0  # optimizer steps between resumable checkpoints; 0: none (the final model is still saved)
    keep_checkpoints: int | None = 2  # the newest this many are kept; 0: none is written; null (None): all are kept
    log_every: int = 1
    save_dtype: str = "float32"


@dataclass
class Recipe:
    model: ModelRecipe = field(default_factory=ModelRecipe)
    data: DataRecipe = field(default_factory=DataRecipe)
    train: TrainRecipe = field(default_factory=TrainRecipe)

    def validate(self) -> "Recipe":
        m, d, t = self.model, self.data, self.train
        needs = {"llava": ["path"], "parts": ["vision", "language"], "scratch": ["tokenizer"]}
        if m.init not in needs:
            raise RecipeError(f"model.init must be one of {', '.join(needs)}, not {m.init!r}")
        for key in needs[m.init]:
            if not getattr(m, key):
                raise RecipeError(f"model.init={m.init} needs model.{key}")
        if not d.path:
            raise RecipeError("data.path names no data file")
        if d.format not in ("plain", "chat"):
            raise RecipeError(f"data.format must be 'plain' or 'chat', not {d.format!r}")
        unknown = [p for p in t.tune if p not in PARTS]
        if unknown or not t.tune:
            raise RecipeError(f"train.tune must list some of {', '.join(PARTS)}; got {t.tune}")
        unknown_lr = [p for p in t.lr if p not in PARTS]
        if unknown_lr:
            raise RecipeError(f"train.lr names {', '.join(unknown_lr)}; the parts are {', '.join(PARTS)}")
        for part, lr in t.lr.items():
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr < 0:
                raise RecipeError(f"train.lr.{part} must be a non-negative number, not {lr!r}")
        if t.lora.r and "language" not in t.tune:
            raise RecipeError("train.lora is set but the language model is not in train.tune")
        if t.lora.r and not t.lora.merge and m.init != "llava":
            raise RecipeError("train.lora.merge: false saves only an adapter, which needs a base checkpoint to load "
                              "onto; it works with model.init: llava")
        if t.precision not in ("auto", "bf16", "fp32"):
            raise RecipeError(f"train.precision must be auto, bf16 or fp32, not {t.precision!r}")
        if t.keep_checkpoints is not None and (isinstance(t.keep_checkpoints, bool) or
                                               not isinstance(t.keep_checkpoints, int) or t.keep_checkpoints < 0):
            raise RecipeError(f"train.keep_checkpoints must be a count (0: none) or null (all), not {t.keep_checkpoints!r}")
        if t.batch_size < 1 or t.grad_accum < 1:
            raise RecipeError("train.batch_size and train.grad_accum must be at least 1")
        ranges = [  # (key, value, lowest, highest or None, interval: "[" / "(" the lowest in or out, "]" / ")" the top)
            ("data.max_length", d.max_length, 1, None, "["), ("data.max_bad_fraction", d.max_bad_fraction, 0, 1, "[]"),
            ("train.epochs", t.epochs, 0, None, "("), ("train.max_steps", t.max_steps, 1, None, "["),
            ("train.warmup_ratio", t.warmup_ratio, 0, 1, "[]"), ("train.min_lr_ratio", t.min_lr_ratio, 0, 1, "[]"),
            ("train.weight_decay", t.weight_decay, 0, None, "["),
            ("train.max_grad_norm", t.max_grad_norm, 0, None, "("),
            ("train.save_every", t.save_every, 0, None, "["), ("train.log_every", t.log_every, 1, None, "["),
            ("train.betas[0]", t.betas[0], 0, 1, "[)"), ("train.betas[1]", t.betas[1], 0, 1, "[)"),
            ("train.lora.r", t.lora.r, 0, None, "["), ("train.lora.alpha", t.lora.alpha, 0, None, "("),
            ("train.lora.dropout", t.lora.dropout, 0, 1, "[)")]
        ranges += [(f"model.scratch.{f.name}", getattr(m.scratch, f.name), 1, None, "[")
                   for f in dataclasses.fields(m.scratch) if isinstance(getattr(m.scratch, f.name), int)]
        ranges += [("model.scratch.pinpoints", side, 1, None, "[") for pair in m.scratch.pinpoints for side in pair]
        for key, value, low, high, interval in ranges:
            if value is None:  # (max_steps: none, the epochs decide)
                continue
            below = value < low or (interval[0] == "(" and value == low)
            above = high is not None and (value > high or (interval[-1] == ")" and value == high))
            if below or above:
                bound = f"in {interval[0]}{low}, {high}{interval[-1]}" if high is not None else \
                    f"{'above' if interval == '(' else 'at least'} {low}"
                raise RecipeError(f"{key} must be {bound}, not {value!r}")
        if t.save_dtype not in DTYPE_NAMES:
            raise RecipeError(f"train.save_dtype must be one of {', '.join(DTYPE_NAMES)}, not {t.save_dtype!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        if self.model.init != "scratch":
            del values["model"]["scratch"]  # sizes a run that loads its model never used would mislead a reader
        return values


def _build(cls, values: Any, where: str):
    """A dataclass from a dict, recursively, refusing unknown keys (a typo must not silently use a default)."""
    if not dataclasses.is_dataclass(cls):
        return values
    if not isinstance(values, dict):
        raise RecipeError(f"{where} must be a mapping of keys, not {values!r:.80}")
    hints = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise RecipeError(f"unknown key(s) in {where}: {', '.join(unknown)} (known: {', '.join(hints)})")
    types = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        default = hints[name].default_factory() if hints[name].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, name if where == "the recipe" else f"{where}.{name}")
            continue
        if not _conforms(value, types[name]):
            key = name if where == "the recipe" else f"{where}.{name}"
            raise RecipeError(f"{key} must be {_describe(types[name])}, not {value!r}")
        if isinstance(default, dict):
            kwargs[name] = {**default, **value}  # setting one learning rate keeps the others
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _conforms(value: Any, hint: Any) -> bool:
    """Whether a value read from YAML or JSON fits a recipe field's annotation (bool is no number here)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(_conforms(v, args[0]) for v in value)
    if origin is tuple:
        return isinstance(value, (list, tuple)) and len(value) == len(args) and all(map(_conforms, value, args))
    if origin is dict:  # (train.lr: Recipe.validate names a part or a learning rate that is wrong)
        return isinstance(value, dict)
    return True


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if arg is type(None) else _describe(arg) for arg in args)
    if origin is list:
        return f"a list of {_plural(args[0])}"
    if origin is tuple:
        return f"a list of {len(args)} numbers"
    if origin is dict:
        return "a mapping of part to learning rate (e.g. train.lr.projector=1e-3)"
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}.get(hint, str(hint))


def _plural(hint: Any) -> str:
    if typing.get_origin(hint) is list:
        return f"lists of {_plural(typing.get_args(hint)[0])}"
    return {bool: "trues or falses", int: "whole numbers", float: "numbers", str: "strings"}.get(hint, str(hint))


_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _numbers(value: Any) -> Any:
    """YAML 1.1 reads `1e-3` (no dot) as a string; every user means the number."""
    if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
        return float(value)
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return value


def _parse_value(text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    quoted = isinstance(value, str) and text.strip()[:1] in ("'", '"')
    return value if quoted else _numbers(value)  # a quoted value is the string it says, 1e5 included


def _read_recipe_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError(f"recipe {path}: " + ("a directory; give the recipe file" if path.is_dir() else
                                                  "no such recipe file"))
    try:
        text = path.read_text(encoding="utf-8")
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except UnicodeDecodeError:
        raise RecipeError(f"recipe {path}: not a text file; a recipe is YAML or JSON") from None
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        where = getattr(e, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else f" ({e})" if kind == "JSON" else ""
        raise RecipeError(f"recipe {path}: not valid {kind}{at}; a recipe's keys mirror "
                          "llava_next.train.recipe.Recipe (see recipes/demo/stage1.yaml)") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise RecipeError(f"recipe {path}: must be a mapping of keys (model:, data:, train:), not "
                          f"{type(values).__name__}; see recipes/demo/stage1.yaml")
    return _numbers(values)


def read_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """A recipe from a YAML / JSON file (or none), then `key.sub=value` overrides applied in order."""
    values: dict[str, Any] = {}
    if path is not None:
        values = _read_recipe_file(Path(path))
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep:
            raise RecipeError(f"override {override!r} must look like key.sub=value")
        node = values
        parts = key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            if node.get(part) is None:  # (absent, or YAML's empty "data:")
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise RecipeError(f"override {override!r}: {'.'.join(parts[:i + 1])} is {node!r}, not a mapping of "
                                  "keys")
        node[parts[-1]] = _parse_value(value)
    for section in ("model", "data", "train"):
        if section in values and values[section] is None:  # (YAML's empty "data:")
            values[section] = {}
    data = values.get("data")
    if isinstance(data, dict) and isinstance(data.get("path"), str):
        data["path"] = [data["path"]]
    recipe = _build(Recipe, values, "the recipe")
    if isinstance(recipe.train.betas, list):
        recipe.train.betas = tuple(recipe.train.betas)
    return recipe.validate()
