"""The multiple-choice benchmarks (mmbench_en_dev, ai2d, mmmu_val) against lmms-eval 0.7.3's own task code: the same
prompts and images from rows in each dataset's schema, the same per-question results and the same totals on tables of
tricky answers and on many random ones, and the schema errors.

lmms-eval is installed without its dependencies. Its task utilities need only pandas, PyYAML and loguru, but the
packages around them import heavy ones at import time (`lmms_eval.tasks` and `lmms_eval.api.filter` import
`datasets`, `lmms_eval.api.metrics` imports `sacrebleu` and `evaluate`): where those are missing, this file puts
empty stand-ins in sys.modules before importing, which the functions compared here never call.
"""

from __future__ import annotations

import ast
import importlib
import io
import random
import sys
import types
from pathlib import Path

import pytest
from PIL import Image

from llava_next.eval.tasks import Skip, TaskDataError, get_task
from llava_next.eval.tasks import ai2d, choices, mmbench, mmmu

pd = pytest.importorskip("pandas")
yaml = pytest.importorskip("yaml")
pytest.importorskip("loguru")
lmms_eval = pytest.importorskip("lmms_eval")
LMMS = Path(lmms_eval.__file__).parent


def _stand_in(name: str, **attrs) -> None:
    """An empty module for `name` when the real one does not import (only names the compared code never calls)."""
    try:
        importlib.import_module(name)
    except ImportError:
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module


def _passthrough(*args, **kwargs):
    return lambda f: f


def _import_lmms_eval_tasks():
    if "lmms_eval.tasks" not in sys.modules:
        try:
            importlib.import_module("lmms_eval.tasks")
        except ImportError:  # its __init__ builds the task registry (datasets, ...): keep just the package path
            package = types.ModuleType("lmms_eval.tasks")
            package.__path__ = [str(LMMS / "tasks")]
            sys.modules["lmms_eval.tasks"] = package
    _stand_in("datasets", Dataset=object)
    _stand_in("sacrebleu")
    _stand_in("lmms_eval.api.registry", register_metric=_passthrough, register_aggregation=_passthrough,
              register_filter=_passthrough)
    return (importlib.import_module("lmms_eval.tasks.mmbench.en_utils"),
            importlib.import_module("lmms_eval.tasks.ai2d.utils"),
            importlib.import_module("lmms_eval.tasks.mmmu.utils"),
            importlib.import_module("lmms_eval.tasks._task_utils.mmmu_mcq_utils"),
            importlib.import_module("lmms_eval.tasks._task_utils.mcq_extract"),
            importlib.import_module("lmms_eval.api.metrics"))


en_utils, ai2d_utils, mmmu_utils, mcq_utils, mcq_extract, lmms_metrics = _import_lmms_eval_tasks()
importlib.import_module("loguru").logger.disable("lmms_eval")  # its notes on every "A" that may be an article


def _yaml(path: Path) -> dict:
    """A task yaml as lmms-eval reads it, less its !function lines (and what they name)."""
    lines = [line for line in path.read_text().splitlines() if "!function" not in line]
    return yaml.safe_load("\n".join(lines))


def _default_kwargs(*paths: str) -> dict:
    config = {}
    for path in paths:  # the included template first, the task's own yaml over it
        config.update(_yaml(LMMS / "tasks" / path))
    return config["lmms_eval_specific_kwargs"]["default"], config


def _png(width=24, height=16, mode="RGB", seed=0) -> dict:
    rng = random.Random(seed)
    image = Image.new(mode, (width, height))
    image.putdata([tuple(rng.randrange(256) for _ in mode) for _ in range(width * height)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def _decoded(cell) -> Image.Image:
    return Image.open(io.BytesIO(cell["bytes"]))


def _same_images(ours: list[Image.Image], theirs: list[Image.Image]) -> None:
    assert [(i.mode, i.size, i.tobytes()) for i in ours] == [(i.mode, i.size, i.tobytes()) for i in theirs]


def _one(task, row):
    (result,) = list(task.samples([row]))
    return result


def _random_answer(rng: random.Random, words: list[str]) -> str:
    """An answer built from pieces that stress the parsers: letters in every wrapping, option texts, phrases, numbers,
    punctuation, unicode, newlines."""
    pieces = words + ["A", "B", "C", "D", "E", "(A)", "(B)", "C.", "D)", ":B", "A,", "b", "c.", "the answer is",
                      "Answer:", "option", "is", "so", "=", "a", "an", "The", ".", ",", "!", "?", "'", '"', "\n", " ",
                      "3", "3.14", "1,000", "-2", "1e3", "0.5", "答案是", "İ", "Ä", "é", "nan", "<image 1>", "(", ")"]
    joiners = ["", " ", " ", "\n", ", "]
    return "".join(rng.choice(pieces) + rng.choice(joiners) for _ in range(rng.randrange(9)))


# =============================== MMBench ===========================================================================

MMB_KWARGS, _ = _default_kwargs("mmbench/_default_template_mmbench_en_yaml")


def _mmb_row(index, answer="A", hint=None, options=("a cat", "a dog", "cat food", None), category="c1", l2="l2a",
             question="Which one is it?", **extra):
    row = {"index": index, "question": question, "hint": hint, "answer": answer,
           "category": category, "L2-category": l2, "image": _png(seed=index % 7), "source": "src",
           "split": "dev", "comment": None}
    row.update(dict(zip("ABCD", options)))
    row.update(extra)
    return row


def _mmb_doc(row):
    """The row as lmms-eval's task sees it: the datasets library hands it a decoded PIL image."""
    return {**row, "image": _decoded(row["image"])}


@pytest.mark.parametrize("change", [
    {}, {"hint": "A hint."}, {"hint": "nan"}, {"hint": ""}, {"hint": float("nan")},
    {"options": ("x", "y", "nan", "")}, {"options": ("x", "y", float("nan"), None)},
    {"options": ("x\n", "y\n\n", None, None)},
    {"options": ("only", None, None, None)}, {"options": (None, None, None, None)}, {"E": "fifth"}, {"E": None},
    {"question": "Unicode: İ ß 答案 — \"quoted\"\n"},
])
def test_mmbench_prompt_and_image_are_lmms_evals(change):
    row = _mmb_row(7, **change)
    sample = _one(mmbench.TASK, row)
    assert sample.prompt == en_utils.mmbench_doc_to_text(_mmb_doc(row), MMB_KWARGS)
    _same_images(sample.images, en_utils.mmbench_doc_to_visual(_mmb_doc(row)))
    assert (sample.id, sample.references) == ("7", "A")


def test_mmbench_yaml_settings():
    _, config = _default_kwargs("mmbench/_default_template_mmbench_en_yaml", "mmbench/mmbench_en_dev_static.yaml")
    task = get_task("mmbench_en_dev")
    assert task is mmbench.TASK
    assert (task.split, task.max_new_tokens) == (config["test_split"], config["generation_kwargs"]["max_new_tokens"])
    assert (task.hub_dataset, task.hub_config) == (config["dataset_path"], config["dataset_name"])
    assert mmbench.OPTIONS_HEADER == _yaml(LMMS / "tasks/mmbench/mmbench.yaml")["metadata"]["sys_prompt"]


MMB_ANSWERS = [
    "A", "B", "C", "D", "E", "F", "a", "b", "(A)", "(B)", "B.", "C,", "D:", "A)", "B).", "(C).", ":D", ":A,", ":B.",
    ":C)", ":D).", "A B", "A cat", "A dog", "A cat is here.", "A dog is on the left", "The answer is B",
    "The answer is B.", "the correct option is (C)", "I choose D", "Answer: C", "Answer: (C)", "答案是B", "选C",
    "a cat", "a dog", "cat food", "A cat food", "cat", "dog", "nan", "", "   ", "\n", "B\n", " C ",
    "Failed to obtain answer via API B", "B. a dog", "(B) a dog", "It is B, not A", "Not A. The answer is B.",
    "A. a cat\nB. a dog", "BB", "AB", "Apple", "Because", "CAT", "DOG", "E.", "(E)", "The dog.", "İ", "ÀB", "B!",
    "'B'", '"C"', "B;", "?", "A?", "D - cat food", "Option D", "option b", "None of them", "A A", "A or B",
]


def _lmms_mmb_result(row, prediction):
    return en_utils.mmbench_process_results(row, [prediction.strip()])["gpt_eval_score"]


def _lmms_mmb_frame(results):
    """The frame lmms-eval's evaluator builds from process_results' records before scoring them."""
    data = pd.DataFrame(results)
    data["prediction"] = [str(x) for x in data["prediction"]]
    for k in list(data.keys()):
        data[k.lower() if k not in "ABCD" else k] = data.pop(k)
    return data


def _lmms_mmb_hits(pairs) -> list[int]:
    """lmms-eval's verdict on each (row, answer) alone, as one question without rotated copies."""
    data = _lmms_mmb_frame([_lmms_mmb_result(row, prediction) for row, prediction in pairs])
    return [en_utils.mmbench_evaluator.eval_sub_data(data.iloc[[i]], {row["index"]: row["answer"]}, static_only=True)
            for i, (row, _) in enumerate(pairs)]


MMB_ROWS = [
    _mmb_row(1, "A"), _mmb_row(2, "B"), _mmb_row(3, "C"), _mmb_row(4, "D", options=("x", "y", "z", "w")),
    _mmb_row(5, "B", options=("cat", "dog", "nan", None)), _mmb_row(6, "A", options=("", "dog", "bird", "fish")),
    _mmb_row(8, "C", options=("a", "b", "c", "d")), _mmb_row(9, "B", options=("A", "B", "C", "D")),
]


@pytest.mark.parametrize("row", MMB_ROWS, ids=lambda r: str(r["index"]))
def test_mmbench_hits_are_lmms_evals_on_tricky_answers(row):
    sample = _one(mmbench.TASK, row)
    theirs = _lmms_mmb_hits([(row, prediction) for prediction in MMB_ANSWERS])
    for prediction, hit in zip(MMB_ANSWERS, theirs):
        assert mmbench.score(sample, prediction)["hit"] == hit, prediction
    assert 0 < sum(theirs) < len(theirs)


def test_mmbench_letter_rules_are_lmms_evals_on_random_answers():
    rng = random.Random(1)
    evaluator = en_utils.mmbench_evaluator
    for i in range(1500):
        row = rng.choice(MMB_ROWS)
        options = {c: row[c] for c in "ABCD" if row[c] is not None}
        answer = _random_answer(rng, [v for v in options.values() if v])
        assert (mmbench.letter_by_form(answer) or False) == evaluator.can_infer_option(answer), answer
        assert (mmbench.letter_by_text(answer, options) or False) == evaluator.can_infer_text(answer, dict(options))
        letters = rng.choice([None, [], sorted(options), ["A", "B"]])
        assert choices.extract_letter(answer, letters) == mcq_extract.extract_mcq_answer(answer, letters), answer
    pairs = []  # and the whole rule chain, per answer
    for i in range(300):
        row = rng.choice(MMB_ROWS)
        pairs.append((row, _random_answer(rng, [row[c] for c in "ABCD" if row[c]])))
    for (row, answer), hit in zip(pairs, _lmms_mmb_hits(pairs)):
        assert mmbench.score(_one(mmbench.TASK, row), answer)["hit"] == hit, answer


def test_mmbench_circular_totals_are_lmms_evals(capsys):
    """Questions with rotated copies (index + k * 1e6): a question counts only when all its copies are right; totals
    overall and per category, against lmms-eval's static evaluation."""
    rng = random.Random(2)
    rows = []
    for q in range(60):
        category, l2 = rng.choice([("c1", "l2a"), ("c2", "l2a"), ("c3", "l2b")])
        for k in range(rng.choice([1, 2, 4])):
            rows.append(_mmb_row(q + k * 1_000_000, answer="ABCD"[(q + k) % 4], category=category, l2=l2,
                                 options=("cat", "dog", "bird", "fish")))
    rows.append(_mmb_row(5_000_999, "A"))  # a copy whose original is absent: ignored
    rng.shuffle(rows)
    predictions = [rng.choice([row["answer"], row["answer"], "A", "(B)", "fish", "The answer is C", "x"])
                   for row in rows]
    samples = list(mmbench.TASK.samples(rows))
    ours = mmbench.aggregate([mmbench.score(s, p) for s, p in zip(samples, predictions)])
    overall, by_category, by_l2 = en_utils.mmbench_evaluator.eval_result(
        [_lmms_mmb_result(r, p) for r, p in zip(rows, predictions)], eval_method="static")
    capsys.readouterr()
    assert ours["gpt_eval_score"] == overall * 100
    assert {k[len("category/"):]: v for k, v in ours.items() if k.startswith("category/")} == \
        {k: v * 100 for k, v in by_category.items()}
    assert {k[len("l2_category/"):]: v for k, v in ours.items() if k.startswith("l2_category/")} == \
        {k: v * 100 for k, v in by_l2.items()}
    assert 0 < ours["gpt_eval_score"] < 100  # some questions right, some wrong: the test can tell


def test_mmbench_schema_errors():
    row = _mmb_row(3)
    for field in ("index", "question", "hint", "answer", "category", "L2-category", "image"):
        with pytest.raises(TaskDataError, match=field):
            _one(mmbench.TASK, {k: v for k, v in row.items() if k != field})
    for change, reason in [({"image": {"bytes": b"not an image", "path": None}}, "does not decode"),
                           ({"image": None}, "image"), ({"question": 5}, "question"), ({"A": 3}, "'A'"),
                           ({"index": "seven"}, "index"), ({"index": True}, "index")]:
        skip = _one(mmbench.TASK, {**row, **change})
        assert isinstance(skip, Skip) and reason in skip.reason, (change, skip)
    assert _one(mmbench.TASK, {**row, "index": "12"}).extra["index"] == 12


# =============================== AI2D ==============================================================================

AI2D_KWARGS, AI2D_CONFIG = _default_kwargs("ai2d/ai2d.yaml")


def _ai2d_row(answer="1", options=("sun", "moon", "earth", "mars"), question="Which body is shown?", seed=0):
    return {"question": question, "options": list(options), "answer": answer, "image": _png(seed=seed)}


def _lmms_ai2d(row, prediction):
    """lmms-eval's path: the flexible-extract filter on the raw answer, process_results' strip, then exact_match with
    the yaml's options, against doc_to_target."""
    doc = {**row, "image": None}
    (filtered,) = ai2d_utils.MultiChoiceRegexFilter().apply([[prediction]], [doc])
    gold = ai2d_utils.ai2d_doc_to_target(doc, AI2D_CONFIG["model_specific_target_kwargs"]["default"])
    options = {k: v for k, v in AI2D_CONFIG["metric_list"][0].items() if k not in ("metric", "aggregation",
                                                                                  "higher_is_better")}
    return lmms_metrics.exact_match_hf_evaluate(references=[gold], predictions=[filtered.strip()],
                                                **options)["exact_match"]


@pytest.mark.parametrize("row", [_ai2d_row(), _ai2d_row("0", ("yes", "no")), _ai2d_row("2", ("a", "b", "c")),
                                 _ai2d_row("3", ("İ", "é\n", "", "x. y")), _ai2d_row("1", (), "Q?\n")])
def test_ai2d_prompt_and_image_are_lmms_evals(row):
    sample = _one(ai2d.TASK, row)
    if not row["options"]:  # no options: the answer points at none, lmms-eval fails on it, the row is skipped
        assert isinstance(sample, Skip)
        return
    doc = {**row, "image": _decoded(row["image"])}
    assert sample.prompt == ai2d_utils.ai2d_doc_to_text(doc, AI2D_KWARGS)
    _same_images(sample.images, ai2d_utils.ai2d_doc_to_visual(doc))
    assert sample.references == ai2d_utils.ai2d_doc_to_target(doc, "mcq")


AI2D_ANSWERS = [
    "A", "B", "C", "D", "b", "B.", "B. moon", "  B. moon", "\nB.", "B .", "B,", "(B)", "(B).", "B)", "[B]", "'B'",
    "B!", "B moon", "The answer is B.", "Answer: B", "moon", "Moon", "", " ", "\n", "B\x00", "B.\x00", "\x00B",
    "b.", "Z.", "BB", "B-", "B…", "Ｂ", "B\n", " b ", "B:", "«B»", "B.B", "A. B.", "\tB", "İ", "B\u00a0",
]


def test_ai2d_scores_are_lmms_evals():
    rows = [_ai2d_row(a) for a in "0123"] + [_ai2d_row("1", ("x", "y"))]
    rng = random.Random(3)
    predictions = [(row, p) for row in rows for p in AI2D_ANSWERS]
    predictions += [(rng.choice(rows), _random_answer(rng, ["sun", "moon"])) for _ in range(1500)]
    scores = []
    for row, prediction in predictions:
        ours = ai2d.score(_one(ai2d.TASK, row), prediction)
        assert ours["exact_match"] == _lmms_ai2d(row, prediction), repr(prediction)
        scores.append(ours)
    total = ai2d.aggregate(scores)["exact_match"]
    assert total == lmms_metrics.mean([_lmms_ai2d(r, p) for r, p in predictions]) and 0 < total < 1


def test_ai2d_yaml_settings_and_schema_errors():
    task = get_task("ai2d")
    assert (task.split, task.max_new_tokens, task.hub_dataset) == (
        AI2D_CONFIG["test_split"], AI2D_CONFIG["generation_kwargs"]["max_new_tokens"], AI2D_CONFIG["dataset_path"])
    row = _ai2d_row()
    for field in ("question", "options", "answer", "image"):
        with pytest.raises(TaskDataError, match=field):
            _one(ai2d.TASK, {k: v for k, v in row.items() if k != field})
    for change, reason in [({"image": {"bytes": b"\x89PNG broken", "path": None}}, "does not decode"),
                           ({"answer": "7"}, "not the number"), ({"answer": "one"}, "not the number"),
                           ({"options": "abc"}, "options"), ({"options": ["a", 2]}, "options"),
                           ({"answer": 1}, "answer")]:
        skip = _one(ai2d.TASK, {**row, **change})
        assert isinstance(skip, Skip) and reason in skip.reason, (change, skip)
    rows = [_ai2d_row(), {**_ai2d_row(), "answer": "x"}, _ai2d_row("0")]
    assert [s.id for s in ai2d.TASK.samples(rows)] == ["0", "1", "2"]  # ids: row numbers, skipped rows counted


# =============================== MMMU ==============================================================================

MMMU_KWARGS, MMMU_CONFIG = _default_kwargs("mmmu/_default_template_yaml", "mmmu/mmmu_val.yaml")


def _mmmu_row(id="validation_Art_Theory_3", question="What does <image 1> show?", options="['a cat', 'a dog']",
              answer="A", question_type="multiple-choice", images=(1, 2, 3, 4, 5, 6, 7)):
    row = {"id": id, "question": question, "options": options, "explanation": "", "answer": answer,
           "img_type": "['Photos']", "topic_difficulty": "Easy", "question_type": question_type, "subfield": "x"}
    row.update({f"image_{n}": (_png(8 + n, 8, seed=n) if n in images else None) for n in range(1, 8)})
    return row


def _mmmu_doc(row):
    return {k: (_decoded(v) if k.startswith("image_") and v else v) for k, v in row.items()}


MMMU_PROMPT_ROWS = [
    _mmmu_row(),
    _mmmu_row(question="Compare <image 2> with <image 1>, and <image 2> again.", options="['<image 3>', 'x', 'y']"),
    _mmmu_row(question="No picture here?", options='["1", "2", "3", "4", "5"]'),
    _mmmu_row(question="How many? <image 1>", options="[]", answer="12", question_type="open"),
    _mmmu_row(question="<image 7> and <image 4>", options="['a', \"b'c\"]", images=(4, 7)),
    _mmmu_row(question="Unicode İ ß 答案\n\n<image 1>", options="['é', '\\n']"),
]


@pytest.mark.parametrize("row", MMMU_PROMPT_ROWS, ids=range(len(MMMU_PROMPT_ROWS)))
def test_mmmu_prompt_and_images_are_lmms_evals(row):
    assert MMMU_CONFIG["metadata"]["interleaved_format"] is False
    sample = _one(mmmu.TASK, row)
    doc = _mmmu_doc(row)
    assert sample.prompt == mmmu_utils.mmmu_doc_to_text(doc, MMMU_KWARGS)
    _same_images(sample.images, mmmu_utils.mmmu_doc_to_visual(doc))
    assert sample.extra["subject"] == mmmu_utils.extract_subset_name(row["id"])


def test_mmmu_images_are_in_number_order_each_once():
    sample = _one(mmmu.TASK, MMMU_PROMPT_ROWS[1])
    assert [im.size for im in sample.images] == [(9, 8), (10, 8), (11, 8)]


class _SeededGuess:
    """Stands in for the `random` module of lmms-eval's MMMU parser: its guesses are the ones this package makes
    (seeded by the question id), so that totals can be compared exactly."""

    def __init__(self):
        self.seed = None

    def choice(self, letters):
        return random.Random(self.seed).choice(letters)


MMMU_CHOICE_ANSWERS = [
    "A", "B", "(A)", "(B)", "A.", "B.", "a", "b", "(C)", "The answer is (B).", "I think (A) or (B)", "A B", "B A",
    "A. a cat", "It shows a dog, clearly, as we can see here.", "It shows a cat and a dog, as we can see.",
    "a dog", "A dog is shown", "The picture shows a dog sitting on the grass.", "", "  ", ".", "A,", ",B", "'A'",
    "(A) is wrong, (B) is right", "B. A.", "A.B.", "Option B is correct", "none", "\nB\n", "答案是B",
    "A.B.x", "xA.B.y", "I really think it is the cat food one", "It is the cat food, the cat food, or a dog",
]
MMMU_OPEN_ANSWERS = [
    "12", "12.0", "12.004", "11.996", "1,2", "12 apples", "The answer is 12.", "so the result is 12", "x = 12",
    "it is 12\nso 13", "twelve", "", "1.2e1", "-12", "12%", "$12", "The value could be 12 or 13.", "A", "a",
    "There are 12.", "is .", "answer is :", "nan", "inf", "1,000,000", "12\n\n", "Thus 0.5", "=12", "12,5",
    "the cat is big", "Big cat", "cat", "The answer is cat.", "the answer is cats", "c", " c ", "İ",
]
MMMU_OPEN_GOLDS = ["12", "cat", "c", "1,000,000", "0.5", "Big cat", "nan", "12.00", "-12"]


def _lmms_mmmu(row, prediction, guess: _SeededGuess):
    guess.seed = row["id"]
    return mmmu_utils.mmmu_process_results(row, [prediction.strip()])["mmmu_acc"]


def test_mmmu_scores_and_totals_are_lmms_evals(monkeypatch, capsys):
    guess = _SeededGuess()
    monkeypatch.setattr(mcq_utils, "random", guess)
    rng = random.Random(4)
    subjects = ["Art_Theory", "Math", "Physics", "Accounting", "Clinical_Medicine", "Unlisted_Subject"]
    cases = []
    for i, subject in enumerate(subjects):
        for j, gold in enumerate(["A", "B", "C"]):
            row = _mmmu_row(id=f"validation_{subject}_{i * 10 + j}", answer=gold,
                            options=rng.choice(["['a cat', 'a dog']", "['a cat', 'a dog', 'cat', 'Cat food']",
                                                "['1', '2', '12', '3.5']"]))
            cases += [(row, p) for p in MMMU_CHOICE_ANSWERS]
            cases += [(row, _random_answer(rng, ["a cat", "a dog", "cat", "12"])) for _ in range(60)]
        for j, gold in enumerate(MMMU_OPEN_GOLDS):
            row = _mmmu_row(id=f"validation_{subject}_{100 + j}", answer=gold, options="[]", question_type="open")
            cases += [(row, p) for p in MMMU_OPEN_ANSWERS]
            cases += [(row, _random_answer(rng, ["12", "cat", "big cat", "is", "0.5"])) for _ in range(25)]
    scores, theirs = [], []
    for row, prediction in cases:
        ours = mmmu.score(_one(mmmu.TASK, row), prediction)
        lmms = _lmms_mmmu(row, prediction, guess)
        (parsed,) = lmms["parsed_pred"]
        if row["question_type"] == "open":
            assert set(map(str, ours["parsed"])) == set(map(str, parsed)), prediction
        else:
            assert ours["parsed"] == parsed, prediction
        _, judged = mmmu_utils.evaluate_mmmu([lmms])
        assert ours["correct"] == judged["acc"], (row["answer"], prediction)
        scores.append(ours)
        theirs.append(lmms)
    totals = mmmu.aggregate(scores)
    overall = mmmu_utils.mmmu_aggregate_results(theirs)
    printed = ast.literal_eval(capsys.readouterr().out.strip().splitlines()[-1])
    assert totals["mmmu_acc"] == overall == printed["Overall"]["acc"]
    expected = {f"mmmu_acc/{k}": v["acc"] for k, v in printed.items() if k != "Overall" and v["num"]}
    # a subject outside MMMU's fields counts in the total; lmms-eval prints no line for it, this package does
    _, unlisted = mmmu_utils.evaluate_mmmu([t for t in theirs if t["subdomain"] == "Unlisted_Subject"])
    expected["mmmu_acc/Unlisted_Subject"] = round(unlisted["acc"], 5)
    assert {k: v for k, v in totals.items() if k != "mmmu_acc"} == expected
    assert 0.05 < totals["mmmu_acc"] < 0.95
    assert any(s.get("guessed") for s in scores)


def test_mmmu_guesses_are_repeatable_and_json_safe():
    import json
    sample = _one(mmmu.TASK, _mmmu_row(options="['w', 'x', 'y', 'z']"))
    first = [mmmu.score(sample, "no letter here")["parsed"] for _ in range(3)]
    assert len(set(first)) == 1 and first[0] in "ABCD"
    open_sample = _one(mmmu.TASK, _mmmu_row(options="[]", answer="nan", question_type="open"))
    result = mmmu.score(open_sample, "nan or inf")
    json.dumps(result, allow_nan=False)
    assert result["correct"] == 0


def test_mmmu_yaml_settings_and_schema_errors():
    task = get_task("mmmu_val")
    assert (task.split, task.max_new_tokens, task.hub_dataset) == (
        MMMU_CONFIG["test_split"], MMMU_CONFIG["generation_kwargs"]["max_new_tokens"], MMMU_CONFIG["dataset_path"])
    row = _mmmu_row(question="<image 1> and <image 2>")
    for field in ("id", "question", "options", "answer", "question_type", "image_2"):
        with pytest.raises(TaskDataError, match=field):
            _one(mmmu.TASK, {k: v for k, v in row.items() if k != field})
    for change, reason in [({"image_2": None}, "image_2"), ({"image_1": {"bytes": b"xx", "path": None}}, "decode"),
                           ({"options": "['a', "}, "options"), ({"options": "[1, 2]"}, "options"),
                           ({"options": "[]"}, "options"), ({"id": "no-subject"}, "subject"),
                           ({"question": "<image 9>"}, "image 9"), ({"answer": None}, "answer")]:
        skip = _one(mmmu.TASK, {**row, **change})
        assert isinstance(skip, Skip) and reason in skip.reason, (change, skip)
    # an open question's options are never read; a question without images has none
    assert _one(mmmu.TASK, {**row, "question": "Why?", "options": "garbage", "question_type": "open"}).images == []


def test_every_task_of_the_group_is_registered():
    for name, module in [("mmbench_en_dev", mmbench), ("ai2d", ai2d), ("mmmu_val", mmmu)]:
        task = get_task(name)
        assert task is module.TASK and task.name == name and task.metrics[0]
