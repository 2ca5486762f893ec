"""Shared fixtures: tiny checkpoints written by transformers 5 (in this process) and 4 (a second interpreter)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import tiny_checkpoints  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# name -> options for tiny_checkpoints.build. "v4_" names are written by transformers 4.x with sparse configs.
SPECS: dict[str, dict] = {
    "llava15": dict(family="llava15"),
    "vicuna": dict(family="vicuna"),
    "vicuna_sharded": dict(family="vicuna", sharded=True),
    "mistral": dict(family="mistral"),
    "mistral_window": dict(family="mistral", sliding_window=200),
    "yi": dict(family="yi"),
    "llama3": dict(family="llama3"),
    "llama3_rope": dict(family="llama3", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2": dict(family="qwen2"),
    "qwen2_window": dict(family="qwen2", sliding_window=200, num_layers=3),
    "vicuna_tied": dict(family="vicuna", tie=True),
    "vicuna_layers": dict(family="vicuna", feature_layer=[-3, -1]),
    "llava15_full": dict(family="llava15", strategy="full", feature_layer=1),
    "llava15_linear_rope": dict(family="llava15", rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "vicuna_template_in_tokenizer": dict(family="vicuna", template_location="tokenizer"),
    "mistral_no_template": dict(family="mistral", template_location="none"),
    "v4_llava15": dict(family="llava15", sparse_config=True),
    "v4_vicuna": dict(family="vicuna", sparse_config=True, sharded=True),
    "v4_mistral": dict(family="mistral", sparse_config=True),
    "v4_yi": dict(family="yi", sparse_config=True),
    "v4_llama3": dict(family="llama3", sparse_config=True),
    "v4_qwen2": dict(family="qwen2", sparse_config=True),
}


def _builder_hash() -> str:
    return hashlib.sha256((HERE / "tiny_checkpoints.py").read_bytes()
                          + json.dumps(SPECS, sort_keys=True).encode()).hexdigest()[:12]


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory) -> Path:
    # LLAVA_NEXT_TEST_CACHE keeps built checkpoints between local runs; CI builds them fresh.
    cache = os.environ.get("LLAVA_NEXT_TEST_CACHE")
    if cache:
        root = Path(cache) / _builder_hash()
        root.mkdir(parents=True, exist_ok=True)
        return root
    return tmp_path_factory.mktemp("checkpoints")


def _tf4_python() -> str | None:
    path = os.environ.get("LLAVA_NEXT_TF4_PYTHON")
    if path and Path(path).exists():
        return path
    default = HERE.parent / ".venv-tf4" / "bin" / "python"
    return str(default) if default.exists() else None


@pytest.fixture(scope="session")
def tiny(checkpoint_root):
    """tiny(name) -> directory of that checkpoint, built on first use."""

    def get(name: str) -> Path:
        out = checkpoint_root / name
        if (out / "config.json").exists():
            return out
        if name.startswith("v4_"):
            python = _tf4_python()
            if python is None:
                if os.environ.get("LLAVA_NEXT_TF4_PYTHON"):
                    pytest.fail("LLAVA_NEXT_TF4_PYTHON does not point at an interpreter")
                pytest.skip("no transformers 4.x interpreter (run `make test`, which creates .venv-tf4)")
            todo = [json.dumps({"name": n, **SPECS[n]}) for n in SPECS
                    if n.startswith("v4_") and not (checkpoint_root / n / "config.json").exists()]
            result = subprocess.run([python, str(HERE / "tiny_checkpoints.py"), str(checkpoint_root), *todo],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"building transformers 4.x checkpoints failed:\n{result.stderr[-3000:]}")
        else:
            tiny_checkpoints.build(out, **SPECS[name])
        return out

    return get


def reference_model(directory: Path):
    """transformers' own model for a checkpoint, in float32."""
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    model_type = json.loads((directory / "config.json").read_text())["model_type"]
    cls = LlavaNextForConditionalGeneration if model_type == "llava_next" else LlavaForConditionalGeneration
    return cls.from_pretrained(directory, dtype=torch.float32).eval()


def reference_processor(directory: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(directory)


def reference_prompt(processor, messages, builtin: str | None = None) -> str:
    """transformers' rendering of a conversation. Its processor never falls back to the tokenizer's template (we
    do), nor to a built-in one (we do): give it the same template explicitly in those cases."""
    template = processor.chat_template or processor.tokenizer.chat_template
    if template is None:
        from llava_next.prompt import builtin_template

        template = builtin_template(builtin)
    return processor.apply_chat_template(messages, add_generation_prompt=True, chat_template=template)


def random_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": None}[mode]
    shape = (height, width) if channels is None else (height, width, channels)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def smooth_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A natural-looking image (smooth gradients and shapes), where resampling differences would show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([
        127 + 120 * np.sin(x / max(width, 1) * rng.uniform(2, 9) + rng.uniform(0, 6)),
        127 + 120 * np.cos(y / max(height, 1) * rng.uniform(2, 9)),
        127 + 120 * np.sin((x + y) / max(width + height, 1) * rng.uniform(2, 9)),
    ], axis=-1)
    return Image.fromarray(base.clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="session")
def load_pipeline():
    """load_pipeline(directory) -> llava_next Pipeline, cached per directory."""
    import llava_next

    cache = {}

    def get(directory: Path):
        key = str(directory)
        if key not in cache:
            cache[key] = llava_next.load(directory, progress=False)
        return cache[key]

    return get


@pytest.fixture(autouse=True)
def no_truncated_image_loading():
    """lmms-eval (imported by the eval tests as the scoring reference) turns Pillow's LOAD_TRUNCATED_IMAGES on for
    the whole process when imported; the package refuses to decode files then. Each test starts with it off."""
    from PIL import ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = False
    yield


@pytest.fixture(scope="session", autouse=True)
def session_layout_cache(tmp_path_factory):
    """Models that fixtures wider than one test load remember their layouts in the session's own directory: never in
    the user's ~/.cache either."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLAVA_NEXT_CACHE_DIR", str(tmp_path_factory.mktemp("session-layout-cache")))
        yield


@pytest.fixture(autouse=True)
def own_layout_cache(tmp_path_factory):
    """Each test's engines measure weight layouts afresh and remember them in a directory of the test's own: never
    in the user's ~/.cache, and never a choice that another test's fake timings left behind (layout_cache.py). (A
    MonkeyPatch of its own: a test's `monkeypatch.undo()` undoes everything the shared fixture did, this too.)"""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLAVA_NEXT_CACHE_DIR", str(tmp_path_factory.mktemp("layout-cache")))
        yield
