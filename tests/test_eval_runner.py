"""The benchmark runner on the demo model with a small exact-match task: outputs, resume after an interruption,
shards merged equal to one process, the split chosen from Hub-layout files, broken rows skipped and counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pq = pytest.importorskip("pyarrow.parquet", reason="the eval extra (pyarrow) is not installed")
import pyarrow as pa  # noqa: E402

import llava_next  # noqa: E402
from llava_next.errors import LlavaWarning  # noqa: E402
from llava_next.eval import runner  # noqa: E402
from llava_next.eval.tasks import Sample, Skip, Task, TaskDataError  # noqa: E402
from llava_next.eval.tasks.base import field_of, image_of  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [("What color is the circle?", "red"), ("What shape is orange?", "square"),
             ("How many shapes are there?", "3"), ("What color is the triangle?", "yellow"),
             ("What shape is red?", "circle"), ("What color is the square?", "orange")]


def samples(rows):
    for i, row in enumerate(rows):
        where = f"row {i}"
        question = field_of(row, "question", where, str)
        try:
            image = image_of(row["image"], where)
        except TaskDataError as e:
            yield Skip(str(row.get("question_id")), str(e))
            continue
        yield Sample(str(field_of(row, "question_id", where)), [image], question + "\nAnswer briefly.", row["answer"])


def score(sample: Sample, prediction: str) -> dict:
    return {"correct": float(prediction.strip().lower() == sample.references)}


def aggregate(scores: list[dict]) -> dict:
    return {"accuracy": sum(s["correct"] for s in scores) / len(scores)}


TASK = Task("shapes_test", "local/shapes", None, "validation", ("accuracy",), samples, score, aggregate,
            max_new_tokens=8)


@pytest.fixture
def task(monkeypatch):
    monkeypatch.setattr(runner, "get_task", lambda name: TASK)
    monkeypatch.setattr("llava_next.eval.tasks.get_task", lambda name: TASK)
    return TASK


@pytest.fixture(scope="module")
def pipe():
    return llava_next.load("demo", progress=False)


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def rows(n: int = 12, broken: tuple[int, ...] = ()) -> list[dict]:
    png = (ROOT / "examples" / "shapes.png").read_bytes()
    out = []
    for i in range(n):
        question, answer = QUESTIONS[i % len(QUESTIONS)]
        image = b"not an image" if i in broken else png
        out.append({"question_id": f"q{i}", "question": question, "answer": answer,
                    "image": {"bytes": image, "path": f"{i}.png"}})
    return out


def test_outputs_equal_direct_generation_and_the_metric(task, pipe, tmp_path):
    data = write_parquet(tmp_path / "data.parquet", rows(12, broken=(5,)))
    result = runner.run_task(pipe, "shapes_test", data, tmp_path / "out", batch_size=4)
    lines = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [x["index"] for x in lines] == [i for i in range(12) if i != 5]
    from PIL import Image

    image = Image.open(ROOT / "examples" / "shapes.png")
    for x in lines[:3]:
        expected = pipe.generate([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": x["prompt"]}]}],
                                 [image], max_new_tokens=8, temperature=0)
        assert x["prediction"] == expected.text
    correct = sum(x["prediction"].strip().lower() == x["references"] for x in lines)
    assert result.metrics == {"accuracy": correct / 11} and result.answered == 11 and result.samples == 12
    assert len(result.skipped) == 1 and result.skipped[0]["id"] == "q5" and "does not decode" in result.skipped[0]["reason"]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["metrics"] == result.metrics and saved["skipped"] == 1 and saved["settings"]["max_new_tokens"] == 8
    assert "| accuracy |" in result.table() and "skipped #5 (q5)" in result.table()


def test_an_interrupted_run_resumes_without_asking_again(task, pipe, tmp_path, monkeypatch):
    data = write_parquet(tmp_path / "data.parquet", rows(10))
    whole = runner.run_task(pipe, "shapes_test", data, tmp_path / "whole", batch_size=3)
    asked = []
    real = pipe.generate

    def interrupted(prompts, images, **kw):
        asked.extend(p[0]["content"][-1]["text"] for p in prompts)
        if len(asked) > 6:
            raise KeyboardInterrupt
        return real(prompts, images, **kw)

    monkeypatch.setattr(pipe, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runner.run_task(pipe, "shapes_test", data, tmp_path / "parts", batch_size=3)
    done = (tmp_path / "parts" / "predictions.jsonl").read_text().splitlines()
    assert len(done) == 6  # two whole batches were written before the interruption
    with open(tmp_path / "parts" / "predictions.jsonl", "a") as f:
        f.write('{"index": 6, "id": "q6", "predi')  # and a line cut short by the kill
    asked.clear()
    monkeypatch.setattr(pipe, "generate", lambda prompts, images, **kw: (asked.extend(range(len(prompts))),
                                                                          real(prompts, images, **kw))[1])
    resumed = runner.run_task(pipe, "shapes_test", data, tmp_path / "parts", batch_size=3)
    assert len(asked) == 4 and resumed.resumed == 6
    assert resumed.metrics == whole.metrics and resumed.answered == whole.answered == 10
    # predictions from other data are refused, not mixed in
    other = write_parquet(tmp_path / "other.parquet", [dict(r, question_id=f"x{i}") for i, r in enumerate(rows(10))])
    with pytest.raises(TaskDataError, match="other data"):
        runner.run_task(pipe, "shapes_test", other, tmp_path / "parts")


def test_predictions_of_another_model_are_not_resumed_as_this_ones(task, pipe, tmp_path, monkeypatch):
    data = write_parquet(tmp_path / "data.parquet", rows(4))
    first = runner.run_task(pipe, "shapes_test", data, tmp_path / "out", limit=2, model_name="demo")
    assert json.loads((tmp_path / "out" / "model.json").read_text()) == \
        {"model": "demo", "dtype": "float32", "quantize": None, "group_size": None}
    assert {"model": "demo", "dtype": "float32", "quantize": None}.items() <= first.settings.items()
    int8 = llava_next.load("demo", progress=False, quantize="int8")
    for other, name, says in ((int8, "demo", r"answered by demo \(float32\), this run is demo \(int8, \w+\)"),
                              (pipe, "my-model", r"answered by demo \(float32\), this run is my-model \(float32\)")):
        with pytest.raises(TaskDataError, match=says + "; use another --output"):
            runner.run_task(other, "shapes_test", data, tmp_path / "out", model_name=name)
    # the same model resumes, and another one starts afresh in a directory of its own
    assert runner.run_task(pipe, "shapes_test", data, tmp_path / "out", model_name="demo").resumed == 2
    fresh = runner.run_task(int8, "shapes_test", data, tmp_path / "int8", model_name="demo")
    assert fresh.resumed == 0 and fresh.settings["quantize"] == "int8"
    # a run written before model.json: resumed, and said so
    (tmp_path / "int8" / "model.json").unlink()
    with pytest.warns(LlavaWarning, match="do not say which model gave them"):
        assert runner.run_task(int8, "shapes_test", data, tmp_path / "int8", model_name="demo").resumed == 4
    # a local model is the same model by any path to it
    local = tmp_path / "ckpt"
    local.mkdir()
    runner.run_task(pipe, "shapes_test", data, tmp_path / "local", limit=1, model_name=str(local))
    monkeypatch.chdir(tmp_path)
    assert runner.run_task(pipe, "shapes_test", data, tmp_path / "local", model_name="ckpt/").resumed == 1


def test_under_torchrun_every_process_checks_every_processes_predictions(task, pipe, tmp_path, monkeypatch):
    data = write_parquet(tmp_path / "data.parquet", rows(4))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    runner.run_task(pipe, "shapes_test", data, tmp_path / "out", limit=1, model_name="demo")  # rank 0's answer alone
    int8 = llava_next.load("demo", progress=False, quantize="int8")
    for rank in ("1", "0"):  # rank 1 has no answers of its own, and starts first
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(TaskDataError, match=r"answered by demo \(float32\), this run is demo \(int8"):
            runner.run_task(int8, "shapes_test", data, tmp_path / "out", model_name="demo")


def test_shards_merge_to_the_single_process_result(task, pipe, tmp_path, monkeypatch):
    data = write_parquet(tmp_path / "data.parquet", rows(9, broken=(4,)))
    single = runner.run_task(pipe, "shapes_test", data, tmp_path / "single", batch_size=4)
    out = tmp_path / "sharded"
    partial = []
    for rank in (1, 0):  # the ranks finish in any order; the last one merges
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        partial.append(runner.run_task(pipe, "shapes_test", data, out, batch_size=4))
    assert partial[0].metrics == {}  # rank 1 finished first: rank 0 had not
    merged = partial[1]
    assert merged.metrics == single.metrics and merged.answered == single.answered == 8
    assert merged.skipped == single.skipped
    assert (out / "predictions.jsonl").read_text() == (tmp_path / "single" / "predictions.jsonl").read_text()


def test_hub_layout_split_choice_and_schema_errors(task, pipe, tmp_path):
    hub = tmp_path / "hub"
    write_parquet(hub / "data" / "validation-00000-of-00001.parquet", rows(3))
    write_parquet(hub / "data" / "test-00000-of-00001.parquet", rows(5))
    assert runner.run_task(pipe, "shapes_test", hub, None).samples == 3
    only_test = tmp_path / "only_test"
    write_parquet(only_test / "test-00000-of-00001.parquet", rows(2))
    with pytest.raises(TaskDataError, match="no parquet files of the 'validation' split.*found: test"):
        runner.run_task(pipe, "shapes_test", only_test, None)
    no_question = write_parquet(tmp_path / "bad.parquet", [{k: v for k, v in r.items() if k != "question"} for r in rows(2)])
    with pytest.raises(TaskDataError, match="'question' is missing"):
        runner.run_task(pipe, "shapes_test", no_question, None)
    empty = write_parquet(tmp_path / "empty.parquet", rows(1))
    with pytest.raises(TaskDataError, match="no rows"):
        runner.run_task(pipe, "shapes_test", empty, None, limit=0)
    not_parquet = tmp_path / "x.parquet"
    not_parquet.write_bytes(b"hello")
    with pytest.raises(TaskDataError, match="not a readable parquet"):
        runner.run_task(pipe, "shapes_test", not_parquet, None)


def test_the_command_line_prints_the_table_and_writes_results(task, tmp_path, capsys):
    from llava_next import cli

    data = write_parquet(tmp_path / "data.parquet", rows(4))
    assert cli.main(["eval", "--model", "demo", "--task", "shapes_test", "--data", str(data),
                     "--output", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "| accuracy |" in out and "4 answered, 0 skipped, 4 in the data" in out
    assert json.loads((tmp_path / "out" / "results.json").read_text())["answered"] == 4


POPE_QUESTIONS = [("Is there a circle in the image?", "yes"), ("Is there a dog in the image?", "no"),
                  ("Is there a square in the image?", "yes"), ("Is there a car in the image?", "no"),
                  ("Is there a triangle in the image?", "yes")]


def pope_parquet(path: Path) -> Path:
    png = (ROOT / "examples" / "shapes.png").read_bytes()
    return write_parquet(path, [{"question_id": str(i), "question": q, "answer": a, "category": "random",
                                 "image_source": "shapes", "image": {"bytes": png, "path": None}}
                                for i, (q, a) in enumerate(POPE_QUESTIONS)])


def test_torchrun_processes_merge_to_the_single_process_result(tmp_path):
    import subprocess
    import sys

    data = pope_parquet(tmp_path / "pope.parquet")
    common = ["--model", "demo", "--task", "pope", "--data", str(data), "--batch-size", "2"]
    subprocess.run([sys.executable, "-m", "llava_next.cli", "eval", *common, "--output", str(tmp_path / "one")],
                   check=True, capture_output=True, cwd=ROOT)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                          "llava_next.cli", "eval", *common, "--output", str(tmp_path / "two")],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["metrics"] == one["metrics"] and two["answered"] == one["answered"] == len(POPE_QUESTIONS)
    assert (tmp_path / "two" / "predictions.jsonl").read_text() == (tmp_path / "one" / "predictions.jsonl").read_text()
    assert sorted(p.name for p in (tmp_path / "two").glob("predictions.rank*.jsonl")) == \
        ["predictions.rank0.jsonl", "predictions.rank1.jsonl"]


def test_pope_end_to_end_through_the_command(pipe, tmp_path, capsys):
    from llava_next import cli
    from llava_next.eval.tasks import get_task

    data = pope_parquet(tmp_path / "pope" / "data" / "test-00000-of-00001.parquet")
    assert cli.main(["eval", "--model", "demo", "--task", "pope", "--data", str(data.parents[1]), "--output",
                     str(tmp_path / "out"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    lines = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    task = get_task("pope")
    assert [x["prediction"] for x in lines] == [a.text for a in pipe.generate(
        [runner.messages_of(s) for s in task.samples(iter(pq.read_table(data).to_pylist()))],
        [[im] for im in [s.images[0] for s in task.samples(iter(pq.read_table(data).to_pylist()))]],
        max_new_tokens=task.max_new_tokens, temperature=0)]
    assert result["answered"] == len(POPE_QUESTIONS) and set(result["metrics"]) >= {"pope_f1_score", "pope_accuracy"}
    assert result["metrics"] == task.aggregate([x["score"] for x in lines])


@pytest.mark.parametrize("text", ["<think>hmm</think> yes", "  no  ", "a<think>x</think>b<think>y</think>c",
                                  "reasoning</think>B", "<think>unclosed yes", "<analysis>a</analysis><think>b</think>C",
                                  "<THINK>x</THINK>", "</think>x</think>y", ""])
def test_reasoning_blocks_are_removed_as_lmms_eval_removes_them(text):
    reasoning = pytest.importorskip("lmms_eval.api.reasoning")
    tags = [list(pair) for pair in runner.REASONING_TAGS]
    assert runner.without_reasoning(text) == reasoning.strip_reasoning_tags(text, tags)


def test_gqa_questions_are_joined_with_the_images_configuration_of_a_hub_layout(pipe, tmp_path):
    png = (ROOT / "examples" / "shapes.png").read_bytes()
    root = tmp_path / "GQA"
    questions = [{"id": f"q{i}", "imageId": "n1" if i != 2 else "missing", "question": q, "answer": a}
                 for i, (q, a) in enumerate(QUESTIONS[:3])]
    write_parquet(root / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet", questions)
    with pytest.raises(TaskDataError, match="testdev_balanced_images"):
        runner.run_task(pipe, "gqa", root, None)  # the questions alone: the images' configuration is named
    write_parquet(root / "testdev_balanced_images" / "testdev-00000-of-00001.parquet",
                  [{"id": "n1", "image": {"bytes": png, "path": None}}, {"id": "n2", "image": {"bytes": png, "path": None}}])
    result = runner.run_task(pipe, "gqa", root, tmp_path / "out")
    assert result.answered == 2 and [s["id"] for s in result.skipped] == ["q2"]
    assert "no image for imageId 'missing'" in result.skipped[0]["reason"]
    assert set(result.metrics) == {"exact_match"}


def test_parquet_without_pyarrow_says_what_to_install(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def without_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_pyarrow)
    # (the package is not on PyPI: the advice is what the README gives)
    with pytest.raises(TaskDataError, match=r"needs pyarrow: pip install pyarrow \(or, in the checkout, "
                                            r"pip install -e '\.\[eval\]'\)"):
        runner._parquet_rows([tmp_path / "test-00000-of-00001.parquet"])


def test_a_prompt_places_its_images_as_lmms_evals_llava_models_do():
    # images before the text, unless the task's text has "<image>" typed in it: lmms-eval's LLaVA models then leave
    # the context as it is (the images where it says)
    from PIL import Image

    image = Image.new("RGB", (8, 8))
    assert runner.messages_of(Sample("0", [image, image], "Which is larger?", "A")) == [{"role": "user", "content": [
        {"type": "image"}, {"type": "image"}, {"type": "text", "text": "Which is larger?"}]}]
    assert runner.messages_of(Sample("1", [image], "Look: <image>\nWhat is it?", "a cat")) == [
        {"role": "user", "content": [{"type": "text", "text": "Look: <image>\nWhat is it?"}]}]
