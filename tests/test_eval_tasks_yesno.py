"""gqa, pope, mme, scienceqa_img against lmms-eval 0.7.3's own task code: prompts, images, per-sample scores and
aggregates on the same rows and predictions, and the schema errors.

lmms-eval is installed without its dependencies, so its task `utils.py` files (and `api/metrics.py`) are loaded
straight from their paths, with stubs for the heavy modules they import at import time and never use in the
functions tested here: `datasets` (gqa/utils.py loads the images with it in process_docs), `sacrebleu` and
`lmms_eval.api.registry` (metrics.py registers its functions there; the stub's decorators do nothing).
"""

from __future__ import annotations

import importlib.util
import io
import itertools
import sys
import types
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from llava_next.eval.tasks import Sample, Skip, TaskDataError, get_task
from llava_next.eval.tasks.gqa import attach_images
from llava_next.eval.tasks.mme import PERCEPTION, read_yes_no

lmms_eval = pytest.importorskip("lmms_eval")
TASKS_DIR = Path(lmms_eval.__file__).parent / "tasks"


def _load(path: Path, name: str, stubs: dict[str, types.ModuleType]) -> types.ModuleType:
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:  # leave sys.modules as it was for the other tests
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def _stub(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def _passthrough(*args, **kwargs):
    return lambda fn: fn


REF = types.SimpleNamespace(
    gqa=_load(TASKS_DIR / "gqa/utils.py", "_lmms_gqa",
              {"datasets": _stub("datasets", Dataset=object, load_dataset=None)}),
    pope=_load(TASKS_DIR / "pope/utils.py", "_lmms_pope", {}),
    mme=_load(TASKS_DIR / "mme/utils.py", "_lmms_mme", {}),
    sqa=_load(TASKS_DIR / "scienceqa/utils.py", "_lmms_sqa", {}),
    metrics=_load(TASKS_DIR.parent / "api/metrics.py", "_lmms_metrics",
                  {"sacrebleu": _stub("sacrebleu"),
                   "lmms_eval.api.registry": _stub("lmms_eval.api.registry", register_aggregation=_passthrough,
                                                   register_metric=_passthrough)}),
)


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _yaml(name: str) -> dict:
    return yaml.load((TASKS_DIR / name).read_text(), Loader=_Loader)


YAMLS = {"gqa": _yaml("gqa/gqa.yaml"), "pope": _yaml("pope/pope.yaml"), "mme": _yaml("mme/mme.yaml"),
         "scienceqa_img": _yaml("scienceqa/scienceqa_img.yaml")}


def _kwargs(task: str) -> dict:
    return YAMLS[task]["lmms_eval_specific_kwargs"]["default"]


def _generated(raw: str) -> str:
    """lmms-eval's ConfigurableTask.process_results strips every generate_until result before scoring."""
    return raw.strip()


# ---------------------------------------------------------------------------------------------------------------
# rows in the datasets' exact schemas (column names and Python types as `datasets` gives them)


def _png(mode: str = "RGB", size=(7, 5)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, {"RGB": (10, 200, 30), "RGBA": (10, 200, 30, 128), "L": 77, "P": 5}[mode]).save(buf, "PNG")
    return buf.getvalue()


def _pil(mode: str, size=(6, 4)) -> Image.Image:
    return Image.open(io.BytesIO(_png(mode, size)))


IMAGES = [_pil("RGB"), _pil("RGBA", (3, 9)), _pil("L", (5, 5)), _pil("P", (8, 2))]

QUESTIONS = [
    "Is the sky blue?",
    "  What colour is the cup on the left?  ",
    "Is there a dog in the image? Please answer yes or no.",
    "Is there a cat? Please answer yes or no. Please answer yes or no.",
    "Which word does not rhyme?",
    "Is this an image of \u00e9glise Saint-Pierre?\n",
    "",
]

GQA_ROWS = [{"id": f"20{i}", "imageId": f"n{i % 3}", "question": q, "answer": a, "fullAnswer": f"It is {a}.",
             "isBalanced": True, "groups": {"global": None, "local": "10c-cup"},
             "entailed": "", "equivalent": f"20{i}",
             "types": {"structural": "query", "semantic": "attr", "detailed": "color"},
             "annotations": {"answer": {}, "question": {}, "fullAnswer": {}},
             "semantic": [], "semanticStr": "select: cup"}
            for i, (q, a) in enumerate(zip(QUESTIONS, ["yes", "blue", "no", "left", "T-shirt", "yes", "no"]))]
GQA_ROWS.append({**GQA_ROWS[0], "id": "299", "question": "Which letter is drawn?", "answer": "i"})
GQA_IMAGES = [{"id": f"n{i}", "image": IMAGES[i]} for i in range(3)]

POPE_ROWS = [{"id": str(i), "question_id": str(i % 3 + 1), "question": q, "answer": a,
              "image_source": f"COCO_val2014_00000031019{i}", "image": IMAGES[i % 4],
              "category": ["adversarial", "popular", "random"][i // 3 % 3]}
             for i, (q, a) in enumerate(zip(QUESTIONS, ["yes", "no", "no", "yes", "Yes", " no ", "NO"]))]

MME_ROWS = [{"question_id": f"{cat}/{i // 2:04d}.png", "image": IMAGES[i % 4],
             "question": q, "answer": a, "category": cat}
            for i, (q, a, cat) in enumerate(zip(
                QUESTIONS, ["Yes", "No", "Yes", "No", "yes.", "No", "Yes"],
                ["existence", "existence", "code_reasoning", "code_reasoning", "OCR", "OCR", "artwork"]))]

SQA_ROWS = [{"image": IMAGES[i % 4] if i != 3 else None, "question": q, "choices": choices, "answer": ans,
             "hint": hint, "task": "closed choice", "grade": "grade3", "subject": "natural science",
             "topic": "physics", "category": "Velocity", "skill": "Compare", "lecture": "...", "solution": "..."}
            for i, (q, choices, ans, hint) in enumerate([
                ("Which is faster?", ["a car", "a snail"], 0, ""),
                ("Which animal's feet are adapted for walking on snow?", ["lynx", "flamingo", "cat"], 2,
                 "Lynxes live in cold places.\nTheir feet are wide."),
                ("What is the capital of Utah?", ["Salt Lake City", "Provo", "Denver", "Ogden"], 1, "Figure: Utah."),
                ("Select the solid.", ["water", "rock"], 1, ""),
                ("Which word would you find on a dictionary page?", ["\u00fcber", "Zo\u00eb", "d\u00e9j\u00e0 vu",
                                                                      "x", "y"], 4, "  "),
            ])]

ROWS = {"gqa": list(attach_images(GQA_ROWS, GQA_IMAGES)), "pope": POPE_ROWS, "mme": MME_ROWS,
        "scienceqa_img": SQA_ROWS}
DOC_TO_TEXT = {"gqa": REF.gqa.gqa_doc_to_text, "pope": REF.pope.pope_doc_to_text, "mme": REF.mme.mme_doc_to_text,
               "scienceqa_img": REF.sqa.sqa_doc_to_text}
DOC_TO_VISUAL = {"gqa": REF.gqa.gqa_doc_to_visual, "pope": REF.pope.pope_doc_to_visual,
                 "mme": REF.mme.mme_doc_to_visual, "scienceqa_img": REF.sqa.sqa_doc_to_visual}
TASK_NAMES = list(ROWS)


def _samples(task: str, rows=None) -> list[Sample | Skip]:
    return list(get_task(task).samples(ROWS[task] if rows is None else rows))


SAMPLES = {task: _samples(task) for task in TASK_NAMES}


def _same_image(a: Image.Image, b: Image.Image) -> bool:
    return a.mode == b.mode and a.size == b.size and a.tobytes() == b.tobytes()


# ---------------------------------------------------------------------------------------------------------------
# the task settings are the yaml's


@pytest.mark.parametrize("task", TASK_NAMES)
def test_settings_are_the_yaml(task):
    t, y = get_task(task), YAMLS[task]
    assert t.name == y["task"]
    assert (t.hub_dataset, t.hub_config, t.split) == (y["dataset_path"], y.get("dataset_name"), y["test_split"])
    assert t.max_new_tokens == y["generation_kwargs"]["max_new_tokens"]
    assert y["generation_kwargs"]["do_sample"] is False
    names = {m["metric"] for m in y["metric_list"]}
    assert set(t.metrics) == names and t.description


# ---------------------------------------------------------------------------------------------------------------
# prompts and images


@pytest.mark.parametrize("task", TASK_NAMES)
def test_prompts_and_images_are_lmms_evals(task):
    samples = _samples(task)
    assert len(samples) == len(ROWS[task]) and all(isinstance(s, Sample) for s in samples)
    for row, sample in zip(ROWS[task], samples):
        assert sample.prompt == DOC_TO_TEXT[task](row, _kwargs(task))
        expected = DOC_TO_VISUAL[task](row)
        assert len(sample.images) == len(expected)
        assert all(_same_image(a, b) for a, b in zip(sample.images, expected))
        assert all(im.mode == "RGB" for im in sample.images)


def test_prompt_details():
    mme = _samples("mme")
    assert mme[2].prompt == "Is there a dog in the image?\nAnswer the question using a single word or phrase."
    assert "Please answer" not in mme[3].prompt
    sqa = _samples("scienceqa_img")
    assert sqa[0].prompt == ("Which is faster?\nA. a car\nB. a snail\n"
                             "Answer with the option's letter from the given choices directly.")
    assert sqa[1].prompt.startswith("Context: Lynxes live in cold places.\nTheir feet are wide.\nWhich animal")
    assert sqa[4].prompt.startswith("Context:   \n")  # a blank hint is still a hint (only "" is left out)
    assert sqa[3].images == [] and [s.references for s in sqa] == ["A", "C", "B", "B", "E"]
    assert _samples("gqa")[1].prompt == ("  What colour is the cup on the left?  \n"
                                         "Answer the question using a single word or phrase.")  # not stripped
    assert _samples("pope")[1].prompt.startswith("What colour")  # stripped


def test_images_from_parquet_cells():
    cells = [{**row, "image": {"bytes": _png("RGBA"), "path": "x.png"}} for row in POPE_ROWS[:2]]
    samples = _samples("pope", cells)
    assert all(s.images[0].mode == "RGB" and s.images[0].size == (7, 5) for s in samples)
    assert _same_image(samples[0].images[0], Image.open(io.BytesIO(_png("RGBA"))).convert("RGB"))


def test_ids_unique_dataset_ids_kept():
    mme = _samples("mme")
    assert [s.id for s in mme[:3]] == ["existence/0000.png", "existence/0000.png#2", "code_reasoning/0001.png"]
    assert mme[1].extra["question_id"] == "existence/0000.png"
    pope = _samples("pope")
    assert len({s.id for s in pope}) == len(pope) and pope[3].extra["question_id"] == "1"
    assert [s.id for s in _samples("gqa")] == [row["id"] for row in GQA_ROWS]
    assert [s.id for s in _samples("scienceqa_img")] == ["0", "1", "2", "3", "4"]


# ---------------------------------------------------------------------------------------------------------------
# schema errors


MISSING = {"gqa": ["question", "answer", "id"], "pope": ["question", "answer", "question_id", "category", "image"],
           "mme": ["question", "answer", "question_id", "category", "image"],
           "scienceqa_img": ["question", "choices", "answer", "hint", "image"]}


@pytest.mark.parametrize("task,field", [(t, f) for t, fields in MISSING.items() for f in fields])
def test_missing_field_is_a_data_error_naming_it(task, field):
    rows = [dict(r) for r in ROWS[task]]
    del rows[1][field]
    with pytest.raises(TaskDataError, match=repr(field)):
        _samples(task, rows)


def test_gqa_questions_without_images_say_how_to_join():
    with pytest.raises(TaskDataError, match="testdev_balanced_images"):
        _samples("gqa", GQA_ROWS)
    rows = list(attach_images(GQA_ROWS, GQA_IMAGES[:2]))  # n2 is missing
    out = _samples("gqa", rows)
    skipped = [s for s in out if isinstance(s, Skip)]
    assert [s.id for s in skipped] == [r["id"] for r in GQA_ROWS if r["imageId"] == "n2"]
    assert "n2" in skipped[0].reason


BAD_VALUES = {
    "gqa": [("image", {"bytes": b"not an image", "path": None}), ("image", b"\x89PNG\r\n\x1a\n truncated"),
            ("question", None), ("answer", 3)],
    "pope": [("image", None), ("image", "a path"), ("answer", "maybe"), ("question_id", 7), ("category", None)],
    "mme": [("image", {"bytes": _png()[:40], "path": None}), ("answer", "Perhaps."), ("question", ["x"])],
    "scienceqa_img": [("choices", "A or B"), ("choices", ["a", 3]), ("answer", 2.0), ("answer", 9), ("answer", -1),
                      ("answer", True), ("hint", None), ("image", {"bytes": b"", "path": None})],
}


@pytest.mark.parametrize("task,field,value", [(t, f, v) for t, cases in BAD_VALUES.items() for f, v in cases])
def test_bad_value_skips_only_that_row(task, field, value):
    rows = [dict(r) for r in ROWS[task]]
    rows[1][field] = value
    out = _samples(task, rows)
    assert len(out) == len(rows)
    assert isinstance(out[1], Skip) and out[1].reason
    assert all(isinstance(s, Sample) for i, s in enumerate(out) if i != 1)


def test_scienceqa_numpy_integer_answer():
    np = pytest.importorskip("numpy")
    rows = [{**SQA_ROWS[2], "answer": np.int8(3)}]
    assert _samples("scienceqa_img", rows)[0].references == "D"


# ---------------------------------------------------------------------------------------------------------------
# per-sample scores: many tricky predictions against every row


PREDICTIONS = [
    "", " ", "\n", "yes", "Yes", "YES", "Yes.", "yes.", " yes ", "\tYes\n", "no", "No", "No.", "NO!", "no,", "No, there is not.",
    "Yes, there is a dog.", "yes!", "Y", "y", "n", "N", "N.", "x", "Yeah", "Nope", "None", "nothing", "not sure",
    "I think yes", "The answer is no", "noo", "ye", "n o", "yes\x00", "yes\x00.", "y\u200bes", "ｙｅｓ", "Yes\u00a0",
    "blue", "Blue.", "BLUE", "blue!", "'blue'", '"blue"', "(blue)", "blue color", "the blue", "left", "Left.",
    "T-shirt", "tshirt", "t-shirt", "T shirt", "TSHIRT", "t_shirt", "two", "2", "Two.", "a", "A", "A.", "A. a car",
    "(A)", "A)", "a.", "A:", "Answer: A", "B", "b", "B.", "B. a snail", "B.a snail", "Bb", "C", "C.", "c", "D", "E",
    "E.", "e", "AB", "A B", "\u00c9", "\u00e9", "\u0130", "\u0130.", "\u0130\u0130", "i\u0307", "\u212a", "\ufb01",
    "stra\u00dfe", "STRASSE", "\u00e9glise", "\u00c9GLISE", "no\u00ebl", "ΑΣ", "ας", "yes no", "no yes", "n.o",
    "y.e.s", "...yes", "Yes...", "nO", "yEs", "\u00a0no\u00a0", "\u3000yes", "no\u2028",
]


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_scores_are_lmms_evals(prediction):
    _check_all_tasks(prediction)


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("yesnoYESNOabcABCD .,!?-_'\"()\n\t\u00a0\u0130\u00e9\u00df\x00")),
               max_size=8))
def test_scores_are_lmms_evals_generated(prediction):
    _check_all_tasks(prediction)


def _check_all_tasks(prediction: str) -> None:
    for task in TASK_NAMES:
        t = get_task(task)
        for row, sample in zip(ROWS[task], SAMPLES[task]):
            assert t.score(sample, prediction) == _lmms_score(task, row, prediction), (task, row, prediction)


def _lmms_score(task: str, doc: dict, raw: str) -> dict:
    """What lmms-eval computes for one doc, in the shape our score returns."""
    result = _generated(raw)
    if task == "gqa":  # no process_results: the yaml's exact_match metric on the stripped result (api/task.py)
        value = REF.metrics.exact_match_hf_evaluate(references=[doc["answer"]], predictions=[result],
                                                    ignore_case=True, ignore_punctuation=True)["exact_match"]
        return {"exact_match": value}
    if task == "pope":
        per_metric = REF.pope.pope_process_results(doc, [result])
        assert all(v == per_metric["pope_accuracy"] for v in per_metric.values())
        return {**per_metric["pope_accuracy"], "category": doc["category"]}
    if task == "mme":
        [(metric, value)] = REF.mme.mme_process_results(doc, [result]).items()
        return {"metric": metric, **value}
    return REF.sqa.sqa_process_results(doc, [result])


def test_score_examples():
    """A few results spelled out (they hold whatever lmms-eval does, and document it)."""
    gqa = get_task("gqa")
    blue = _samples("gqa")[1]
    assert [gqa.score(blue, p)["exact_match"] for p in ["Blue.", " BLUE ", "(blue)", "the blue", "blue color"]] == [
        1.0, 1.0, 1.0, 0.0, 0.0]
    shirt = _samples("gqa")[4]
    assert [gqa.score(shirt, p)["exact_match"] for p in ["tshirt", "T shirt"]] == [1.0, 0.0]
    pope = get_task("pope")
    yes = _samples("pope")[0]
    assert [pope.score(yes, p)["score"] for p in ["Yes", " yes\n", "Yes.", "Yes, there is"]] == [1.0, 1.0, 0.0, 0.0]
    assert [read_yes_no(p) for p in ["Yes.", "y", "x", "None", "not sure", "I think yes", "nOo", "..no"]] == [
        "yes", "yes", "other", "no", "no", "other", "no", "no"]
    sqa = get_task("scienceqa_img")
    c = _samples("scienceqa_img")[1]
    assert [sqa.score(c, p)["exact_match"] for p in ["C", "c", "C. cat", "c. cat", "(C)", "C)", "The answer is C"]] == [
        1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


# ---------------------------------------------------------------------------------------------------------------
# aggregates over many samples


def _many(task: str, n: int, seed: int):
    """n (row, sample, prediction) triples: the task's rows repeated, each with a prediction from the table."""
    rows = ROWS[task]
    samples = [s for s in get_task(task).samples(rows)]
    out = []
    for i in range(n):
        j = (i * 7 + seed) % len(rows)
        out.append((rows[j], samples[j], PREDICTIONS[(i * 13 + seed * 5) % len(PREDICTIONS)]))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_gqa_and_scienceqa_means_are_lmms_evals(seed):
    for task in ("gqa", "scienceqa_img"):
        t = get_task(task)
        triples = _many(task, 97, seed)
        ours = t.aggregate([t.score(s, p) for _, s, p in triples])
        theirs = REF.metrics.mean([_lmms_score(task, row, p)["exact_match"] for row, _, p in triples])
        assert ours == {"exact_match": theirs}


@pytest.mark.parametrize("seed", range(6))
def test_pope_aggregates_are_lmms_evals(seed):
    t = get_task("pope")
    triples = _many("pope", 101 + seed, seed)
    ours = t.aggregate([t.score(s, p) for _, s, p in triples])
    results = [REF.pope.pope_process_results(row, [_generated(p)])["pope_accuracy"] for row, _, p in triples]
    theirs = {"pope_accuracy": REF.pope.pope_aggregate_accuracy(results),
              "pope_precision": REF.pope.pope_aggregate_precision(results),
              "pope_recall": REF.pope.pope_aggregate_recall(results),
              "pope_f1_score": REF.pope.pope_aggregate_f1_score(results),
              "pope_yes_ratio": REF.pope.pope_aggregate_yes_ratio(results)}
    assert ours == theirs and list(ours) == list(t.metrics)


def test_pope_aggregates_on_edge_cases():
    t = get_task("pope")
    yes, no = _samples("pope")[0], _samples("pope")[1]
    for preds in [[], [(yes, "maybe")], [(no, "no")], [(no, "yes")], [(yes, "no"), (no, "no")],
                  [(yes, "yes"), (no, "yes"), (yes, "blah")]]:
        scores = [t.score(s, p) for s, p in preds]
        if not scores:
            assert t.aggregate(scores)["pope_f1_score"] == 0.0
            continue
        theirs = {k: getattr(REF.pope, f"pope_aggregate_{k[len('pope_'):]}")(scores) for k in t.metrics}
        assert t.aggregate(scores) == theirs


def _mme_pairs(seed: int, n_images: int):
    """A full MME-like set: for each of n images in categories of both kinds, the two questions (yes and no)."""
    cats = sorted(PERCEPTION) + ["commonsense_reasoning", "numerical_calculation", "text_translation",
                                 "code_reasoning"]
    rows = []
    for i in range(n_images):
        cat = cats[(i * 5 + seed) % len(cats)]
        for answer in ("Yes", "No"):
            rows.append({"question_id": f"{cat}/{i:04d}.png", "image": IMAGES[0], "category": cat,
                         "question": f"Is it {i}? Please answer yes or no.", "answer": answer})
    return rows


@pytest.mark.parametrize("seed", range(5))
def test_mme_aggregates_are_lmms_evals(seed):
    t = get_task("mme")
    rows = _mme_pairs(seed, 60)
    preds = [PREDICTIONS[(i * 11 + seed * 3) % len(PREDICTIONS)] for i in range(len(rows))]
    ours = t.aggregate([t.score(s, p) for s, p in zip(t.samples(rows), preds)])
    by_metric: dict[str, list] = {}
    for row, p in zip(rows, preds):
        for metric, value in REF.mme.mme_process_results(row, [_generated(p)]).items():
            by_metric.setdefault(metric, []).append(value)
    theirs = {m: REF.mme.mme_aggregate_results(v) for m, v in by_metric.items()}
    assert ours == theirs
    assert 0 <= ours["mme_perception_score"] <= 2000 and 0 <= ours["mme_cognition_score"] <= 800


def test_mme_perfect_and_broken_pairs():
    t = get_task("mme")
    rows = _mme_pairs(0, 14)  # one image in each of the 14 categories
    samples = list(t.samples(rows))
    perfect = t.aggregate([t.score(s, r["answer"]) for s, r in zip(samples, rows)])
    assert perfect == {"mme_perception_score": 2000.0, "mme_cognition_score": 800.0}
    always_yes = t.aggregate([t.score(s, "Yes") for s in samples])  # acc 50, acc+ 0 in every category
    assert always_yes == {"mme_perception_score": 500.0, "mme_cognition_score": 200.0}
    with pytest.raises(TaskDataError, match="pairs"):
        t.aggregate([t.score(s, "yes") for s in samples[1:]])


def test_mme_on_another_benchmarks_data_says_so():
    from llava_next.eval.tasks.mme import COGNITION

    # MME's 14 categories are lmms-eval's
    assert (PERCEPTION, COGNITION) == (set(REF.mme.eval_type_dict["Perception"]),
                                       set(REF.mme.eval_type_dict["Cognition"]))
    # POPE's rows have MME's fields, but categories MME has not: the whole run stops at the first, naming it
    with pytest.raises(TaskDataError, match=r"mme row 0 has the category 'adversarial', not one of MME's 14 .*"
                                            r"is --data MME's \(lmms-lab-encoder/MME\)\?"):
        list(get_task("mme").samples(POPE_ROWS))


def test_every_task_is_json_serialisable():
    import json

    for task in TASK_NAMES:
        t = get_task(task)
        samples = [s for s in t.samples(ROWS[task])]
        scores = [t.score(s, p) for s, p in zip(samples, itertools.cycle(["Yes", "A", "no"]))]
        json.dumps(scores)
        json.dumps([s.references for s in samples] + [s.extra for s in samples])
        if task != "mme":  # the 7 MME rows do not make complete pairs
            assert set(t.aggregate(scores)) == set(t.metrics)
