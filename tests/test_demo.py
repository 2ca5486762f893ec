"""The bundled demo model: it loads by name, answers about the example image, and keeps its stated accuracy."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import llava_next
from llava_next.data import synth
from llava_next.eval.vqa import evaluate

ROOT = Path(__file__).resolve().parent.parent


def test_make_demo_command_answers_about_the_example_image():
    # the command `make demo` runs; the example image holds a red circle, a yellow triangle and an orange square
    command = [sys.executable, "-m", "llava_next.cli", "generate", "--model", "demo", "--image",
               str(ROOT / "examples" / "shapes.png")]
    for question, answer in [("What color is the circle?", "red"), ("What shape is orange?", "square"),
                             ("How many shapes are there?", "3")]:
        result = subprocess.run([*command, "--prompt", question], capture_output=True, text=True, check=True)
        assert result.stdout.strip() == answer, (question, result.stdout, result.stderr)


def test_demo_model_keeps_the_accuracy_the_readme_states(tmp_path):
    synth.generate(tmp_path, 200, seed=1234, turns=1)
    pipe = llava_next.load("demo", progress=False)
    result = evaluate(pipe, tmp_path / "qa.json", limit=200)
    stated = re.search(r"\| \*\*all\*\* \| 500 \| \d+ \| ([\d.]+)%", (ROOT / "README.md").read_text())
    assert stated, "the README's accuracy table is missing"
    # the first 200 of the README's 500 questions: the same model, so within sampling noise of the stated figure
    assert result.accuracy * 100 >= float(stated.group(1)) - 6, result.table()
    assert result.accuracy >= 0.85, result.table()


def test_demo_model_is_small_and_carries_its_recipes_and_logs():
    directory = ROOT / "llava_next" / "demo" / "model"
    assert sum(f.stat().st_size for f in directory.iterdir()) < 25 * 2**20
    for name in ["config.json", "model.safetensors", "tokenizer.json", "stage1-recipe.yaml", "stage2-recipe.yaml",
                 "stage1-train_log.jsonl", "stage2-train_log.jsonl", "eval.md"]:
        assert (directory / name).is_file(), name
