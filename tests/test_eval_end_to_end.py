"""`llava-next eval` and lmms-eval's own command line (with the llava_next_pkg plugin and local task yamls) on the
same tiny splits of several benchmarks give the same prompts, the same answers and the same scores.

Each task's split is a few rows in the exact schema of the Hub's parquet files (synthetic shapes pictures, no
network), written with the `datasets` feature metadata so that lmms-eval, which loads them through `datasets`,
hands its task code the types it gets from the Hub (PIL images, lists of strings, lists of dicts). One lmms-eval
run evaluates all the local tasks (each is lmms-eval's own task yaml, included, reading the local parquet); then
`run_task` evaluates each split with the same engine (POPE is covered by test_lmms_plugin.py).
"""

from __future__ import annotations

import glob
import importlib.util
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from test_lmms_plugin import INSTALL, _missing, _registered

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(bool(_missing()), reason=f"lmms-eval or its runtime dependencies are not installed "
                                                          f"({', '.join(_missing())}): {INSTALL}")

S = {"dtype": "string", "_type": "Value"}
I64 = {"dtype": "int64", "_type": "Value"}
IMAGE = {"_type": "Image"}


def _strings():
    return {"_type": "List", "feature": dict(S)}


def _pictures(n: int, seed: int) -> list[bytes]:
    """n synthetic shapes scenes (the demo model's training pictures) as PNG bytes."""
    from llava_next.data import synth

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        buffer = io.BytesIO()
        synth._draw(synth._scene(rng), rng).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def _cell(data: bytes) -> dict:
    return {"bytes": data, "path": None}


QUESTIONS = ["What shape is in the image?", "What color is the circle?", "How many shapes are there?",
             "Is there a red square in the image?"]


def _mme():
    pics = _pictures(2, 1)
    rows = []
    for i, (category, answers) in enumerate((("existence", ("no", "yes")), ("code_reasoning", ("no", "yes")))):
        for j, answer in enumerate(answers):
            rows.append({"question_id": f"{category}/{i}.png", "image": _cell(pics[i]),
                         "question": f"{QUESTIONS[3 if j == 0 else 0]} Please answer yes or no.", "answer": answer,
                         "category": category})
    features = {"question_id": S, "image": IMAGE, "question": S, "answer": S, "category": S}
    return rows, features


def _scienceqa():
    pics = _pictures(4, 2)
    rows = []
    for i in range(4):
        rows.append({"image": _cell(pics[i]), "question": QUESTIONS[i % 3],
                     "choices": ["circle", "square", "triangle"][: 2 + i % 2], "answer": i % 2,
                     "hint": "" if i % 2 else "The picture shows shapes.", "task": "closed choice", "grade": "grade4",
                     "subject": "natural science", "topic": "shapes", "category": "Shapes", "skill": "Identify",
                     "lecture": "", "solution": ""})
    features = {"image": IMAGE, "question": S, "choices": _strings(), "answer": {"dtype": "int8", "_type": "Value"},
                "hint": S, "task": S, "grade": S, "subject": S, "topic": S, "category": S, "skill": S, "lecture": S,
                "solution": S}
    return rows, features


def _vqav2():
    pics = _pictures(4, 3)
    words = ["circle", "red", "2", "yes"]
    rows = []
    for i in range(4):
        answers = [words[i]] * 2 + [words[(i + 1) % 4]] * 8
        rows.append({"question_type": "what", "multiple_choice_answer": words[i],
                     "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                 for k, a in enumerate(answers)],
                     "image_id": 9000 + i, "answer_type": "other", "question_id": 100 + i, "question": QUESTIONS[i],
                     "image": _cell(pics[i])})
    features = {"question_type": S, "multiple_choice_answer": S,
                "answers": {"_type": "List", "feature": {"answer": S, "answer_confidence": S, "answer_id": I64}},
                "image_id": I64, "answer_type": S, "question_id": I64, "question": S, "image": IMAGE}
    return rows, features


def _textvqa():
    pics = _pictures(4, 4)
    answers = [["2"] * 10, ["circle"] * 3 + ["red"] * 7, ["purple"] + ["2"] * 9, ["no"] * 2 + ["circle"] * 8]
    rows = []
    for i in range(4):
        rows.append({"image_id": f"img{i}", "question_id": 200 + i, "question": QUESTIONS[i],
                     "question_tokens": QUESTIONS[i].split(), "image": _cell(pics[i]), "image_width": 64,
                     "image_height": 64, "flickr_original_url": "", "flickr_300k_url": "",
                     "answers": answers[i], "image_classes": ["Sign"],
                     "set_name": "val", "ocr_tokens": ["STOP", "ahead"]})
    features = {"image_id": S, "question_id": I64, "question": S, "question_tokens": _strings(), "image": IMAGE,
                "image_width": I64, "image_height": I64, "flickr_original_url": S, "flickr_300k_url": S,
                "answers": _strings(), "image_classes": _strings(), "set_name": S, "ocr_tokens": _strings()}
    return rows, features


def _docvqa():
    pics = _pictures(4, 5)
    answers = [["triangle", "a triangle"], ["circles"], ["2", "two"], ["yes"]]  # "circles": ANLS's partial credit
    rows = []
    for i in range(4):
        rows.append({"questionId": str(300 + i), "question": QUESTIONS[i], "question_types": ["form"],
                     "image": _cell(pics[i]), "docId": 17 + i, "ucsf_document_id": "abc",
                     "ucsf_document_page_no": "1", "answers": answers[i],
                     "data_split": "val"})
    features = {"questionId": S, "question": S, "question_types": _strings(), "image": IMAGE, "docId": I64,
                "ucsf_document_id": S, "ucsf_document_page_no": S, "answers": _strings(), "data_split": S}
    return rows, features


def _chartqa():
    pics = _pictures(4, 6)
    rows = [{"type": ("human_test", "augmented_test")[i % 2], "question": QUESTIONS[i],
             "answer": ["red", "green", "2", "yes"][i], "image": _cell(pics[i])} for i in range(4)]
    return rows, {"type": S, "question": S, "answer": S, "image": IMAGE}


def _ai2d():
    pics = _pictures(4, 7)
    rows = [{"question": QUESTIONS[i], "options": ["circle", "square", "red", "2"], "answer": str(i % 4),
             "image": _cell(pics[i])} for i in range(4)]
    return rows, {"question": S, "options": _strings(), "answer": S, "image": IMAGE}


FILTERS = {"ai2d": "flexible-extract"}  # the filter a task's yaml names, where it names one

def _mmmu():
    """Open questions only: a multiple-choice answer that names no option is scored by a random letter, drawn from
    Python's global generator in lmms-eval and from a generator seeded by the question id here (so runs repeat);
    the demo model's answers are not letters, so multiple-choice scores would compare two coin tosses."""
    pics = _pictures(4, 8)
    rows = []
    for i in range(4):
        row = {"id": f"validation_{('Art', 'Math', 'Physics', 'Economics')[i]}_{i + 1}",
               "question": f"<image 1> {QUESTIONS[i]}", "options": "[]", "explanation": "",
               "answer": ["triangle", "orange", "2", "yes"][i], "img_type": "['Diagrams']", "topic_difficulty": "Easy",
               "question_type": "open", "subfield": "shapes"}
        row.update({f"image_{n}": (_cell(pics[i]) if n == 1 else None) for n in range(1, 8)})
        rows.append(row)
    features = {name: S for name in ("id", "question", "options", "explanation", "answer", "img_type",
                                     "topic_difficulty", "question_type", "subfield")}
    features.update({f"image_{n}": IMAGE for n in range(1, 8)})
    return rows, features


def _mmbench():
    """Three questions and a copy of the first with its options rotated (index + 1,000,000: MMBench's circular
    evaluation, which counts a question only when every copy is right)."""
    pics = _pictures(3, 10)
    colors = ["red", "green", "blue", "purple"]
    rows = []
    asked = (("What color is the circle?", "B"), ("What color is the largest shape?", "A"),
             ("What color is the square?", "C"))
    for index, (question, answer) in enumerate(asked):
        rows.append({"index": index, "question": question, "hint": None if index else "Look at the shapes.",
                     "answer": answer, "category": ("color", "shape")[index % 2], "L2-category": "perception",
                     "image": _cell(pics[index]), "source": "synth", "split": "dev", "comment": None,
                     **dict(zip("ABCD", colors))})
    rotated = dict(rows[0], index=1_000_000, answer="A", **dict(zip("ABCD", colors[1:] + colors[:1])))
    features = {"index": I64, "question": S, "hint": S, "answer": S, "category": S, "L2-category": S, "image": IMAGE,
                "source": S, "split": S, "comment": S, "A": S, "B": S, "C": S, "D": S}
    return [*rows, rotated], features


GQA_JOIN = '''"""lmms-eval's gqa_process_docs with the pictures read from the local parquet instead of the Hub."""
import datasets


def process_docs(dataset):
    images = datasets.load_dataset("parquet", data_files={"testdev": %r}, split="testdev")
    by_id = {row["id"]: row["image"].convert("RGB") for row in images}
    return dataset.map(lambda doc: {"image": by_id[doc["imageId"]]})
'''


def _gqa_rows():
    """The question rows (config testdev_balanced_instructions) and the picture rows (testdev_balanced_images)."""
    pics = _pictures(3, 9)
    images = [{"id": f"n{100 + i}", "image": _cell(pics[i])} for i in range(3)]
    questions = [{"id": f"20{i}", "imageId": f"n{100 + i % 3}", "question": QUESTIONS[i],
                  "answer": ["circle", "red", "2", "yes"][i], "fullAnswer": "", "isBalanced": True,
                  "groups": {"global": None, "local": "01"}, "entailed": "[]", "equivalent": "[]",
                  "types": {"structural": "query", "semantic": "attr", "detailed": "color"},
                  "annotations": {"answer": "{}", "question": "{}", "fullAnswer": "{}"}, "semantic": "[]",
                  "semanticStr": ""} for i in range(4)]
    question_features = {"id": S, "imageId": S, "question": S, "answer": S, "fullAnswer": S,
                         "isBalanced": {"dtype": "bool", "_type": "Value"}, "groups": {"global": S, "local": S},
                         "entailed": S, "equivalent": S, "types": {"structural": S, "semantic": S, "detailed": S},
                         "annotations": {"answer": S, "question": S, "fullAnswer": S}, "semantic": S,
                         "semanticStr": S}
    return questions, question_features, images, {"id": S, "image": IMAGE}


# task -> (rows builder, lmms-eval's task yaml (relative to lmms_eval/tasks), the split lmms-eval evaluates)
TASKS = {
    "mme": (_mme, "mme/mme.yaml", "test"),
    "scienceqa_img": (_scienceqa, "scienceqa/scienceqa_img.yaml", "test"),
    "vqav2_val": (_vqav2, "vqav2/vqav2_val.yaml", "validation"),
    "textvqa_val": (_textvqa, "textvqa/textvqa_val.yaml", "validation"),
    "docvqa_val": (_docvqa, "docvqa/docvqa_val.yaml", "validation"),
    "chartqa": (_chartqa, "chartqa/chartqa.yaml", "test"),
    "ai2d": (_ai2d, "ai2d/ai2d.yaml", "test"),
    "mmmu_val": (_mmmu, "mmmu/mmmu_val.yaml", "validation"),
    # lmms-eval's mmbench_en_dev asks a GPT judge for the answers its rules cannot place; its judge-free variant
    # mmbench_en_dev_static (same data, prompt, generation and metric name) is what our mmbench_en_dev scores
    "mmbench_en_dev": (_mmbench, "mmbench/mmbench_en_dev_static.yaml", "dev"),
}
# what a local task changes besides its data: MMBench's second metric, "submission", is an Excel export (it needs
# openpyxl, which lmms-eval's command line does not), so the local task keeps the score alone
EXTRA = {"mmbench_en_dev": "metric_list:\n"
                           "  - metric: gpt_eval_score\n"
                           "    aggregation: !function lmms_eval.tasks.mmbench.en_utils."
                           "mmbench_aggregate_dev_results_static\n"
                           "    higher_is_better: true\n"}


ALL = [*TASKS, "gqa"]


def _write_parquet(path: Path, rows: list[dict], features: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Features

    schema = Features.from_dict(features).arrow_schema
    schema = schema.with_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def _write_task(directory: Path, task: str, yaml: str, split: str, parquet: Path, extra: str = "") -> None:
    tasks = Path(importlib.util.find_spec("lmms_eval").submodule_search_locations[0]) / "tasks"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{task}_local.yaml").write_text(
        f"include: {json.dumps(str(tasks / yaml))}\n"
        f"task: {task}_local\n"
        "dataset_path: parquet\n"
        "dataset_name: null\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    {split}: {json.dumps(str(parquet.resolve()))}\n" + extra
    )


@pytest.fixture(scope="module")
def lmms_run(tmp_path_factory):
    if not _registered():
        pytest.skip(f"the installed llava-next metadata has no lmms_eval.models entry point: {INSTALL}")
    tmp = tmp_path_factory.mktemp("e2e")
    parquets = {}
    for task, (build, yaml, split) in TASKS.items():
        rows, features = build()
        parquets[task] = tmp / "data" / task / f"{split}.parquet"
        _write_parquet(parquets[task], rows, features)
        _write_task(tmp / "tasks", task, yaml, split, parquets[task], EXTRA.get(task, ""))
    # GQA: lmms-eval's question rows name their picture by imageId, and its process_docs joins them with the Hub's
    # picture config (network); here that join reads a local picture parquet, and ours is gqa.attach_images
    questions, question_features, images, image_features = _gqa_rows()
    _write_parquet(tmp / "data" / "gqa" / "questions.parquet", questions, question_features)
    _write_parquet(tmp / "data" / "gqa" / "images.parquet", images, image_features)
    (tmp / "tasks" / "gqa_join.py").write_text(GQA_JOIN % str(tmp / "data" / "gqa" / "images.parquet"))
    _write_task(tmp / "tasks", "gqa", "gqa/gqa.yaml", "testdev", tmp / "data" / "gqa" / "questions.parquet",
                "process_docs: !function gqa_join.process_docs\n")
    from llava_next.eval.tasks.gqa import attach_images
    import pyarrow.parquet as pq

    parquets["gqa"] = tmp / "data" / "gqa" / "joined.parquet"
    joined = list(attach_images(pq.read_table(tmp / "data" / "gqa" / "questions.parquet").to_pylist(), images))
    _write_parquet(parquets["gqa"], joined, {**question_features, "image": IMAGE})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp / "hf-datasets"), "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "lmms_eval", "--model", "llava_next_pkg",
               "--model_args", "pretrained=demo,dtype=float32", "--tasks", ",".join(f"{t}_local" for t in ALL),
               "--include_path", str(tmp / "tasks"), "--batch_size", "4", "--output_path", str(tmp / "out"),
               "--log_samples"]
    run = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    # (lmms-eval exits 0 after an error in a task's code, and writes no results file)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # (out/submissions/ holds the tasks' own files, MMBench's "..._results.json" among them)
    [results_file] = [f for f in glob.glob(str(tmp / "out" / "*" / "*_results.json"))
                      if Path(f).parent.name != "submissions"] or [None]
    assert results_file, run.stdout[-3000:] + run.stderr[-3000:]
    return tmp, parquets, json.loads(Path(results_file).read_text())["results"]


@pytest.fixture(scope="module")
def pipe():
    import llava_next

    return llava_next.load("demo", dtype="float32", progress=False)


@pytest.mark.parametrize("task", ALL)
def test_lmms_eval_and_llava_next_eval_agree(task, lmms_run, pipe):
    from llava_next.eval.runner import run_task

    tmp, parquets, results = lmms_run
    [path] = glob.glob(str(tmp / "out" / "*" / f"*_samples_{task}_local.jsonl"))
    logged = sorted((json.loads(line) for line in open(path)), key=lambda s: s["doc_id"])
    ours = run_task(pipe, task, parquets[task], tmp / "ours" / task, batch_size=4)
    predicted = [json.loads(line) for line in (tmp / "ours" / task / "predictions.jsonl").read_text().splitlines()]
    assert len(predicted) == len(logged)
    assert [p["prompt"] for p in predicted] == [s["input"] for s in logged]
    # the model's raw answer: lmms-eval logs "resps" only where a filter changed it (ai2d's letter extraction)
    raw = [s.get("resps", s["filtered_resps"]) for s in logged]
    assert [p["prediction"] for p in predicted] == [r[0] if isinstance(r, list) and len(r) == 1 else r for r in raw]
    # the scores: "<metric>,<filter>" in lmms-eval's results ("none" where the task has no filter)
    filter_name = FILTERS.get(task, "none")
    # (every metric the task names; MMMU's per-subject and per-field accuracies are in lmms-eval's log, not its json)
    from llava_next.eval.tasks import get_task

    named = set(get_task(task).metrics) | {name for name in ours.metrics
                                           if f"{name},{filter_name}" in results[f"{task}_local"]}
    theirs = {name: results[f"{task}_local"][f"{name},{filter_name}"] for name in named}
    assert {name: ours.metrics[name] for name in named} == pytest.approx(theirs)
