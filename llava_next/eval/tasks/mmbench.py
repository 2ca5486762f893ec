"""MMBench, English, dev split (mmbench_en_dev), scored without a judge model.

lmms-eval's mmbench_en_dev asks a GPT model to match the answers its rules cannot place; its mmbench_en_dev_static
variant (same data, prompt and generation) replaces the judge with rules alone, and this module is that variant:
1. the MMBench rules (VLMEvalKit's `can_infer`): a lone option letter among the answer's words ("B", "(B)", "B.",
   ...), else the one option whose text the answer contains;
2. if those find nothing, lmms-eval's general letter extractor (`choices.extract_letter`).

MMBench scores by circular evaluation, and lmms-eval applies it to the dev split too: the data holds each question
once with index i < 1,000,000 and again with its options rotated at index i + k * 1,000,000, and a question counts
as right only if every copy of it is. The score is over the original questions, in percent.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Iterator

from PIL import Image

from .base import RowError, Sample, Skip, Task, rgb_image
from .choices import extract_letter, is_missing, read_fields, skip_bad_rows

POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."
OPTIONS_HEADER = "There are several options:"  # mmbench.yaml's metadata.sys_prompt
PROMPT_LETTERS = "ABCDE"  # the option columns the prompt shows, when the data has them
SCORED_LETTERS = "ABCD"  # the option columns the scoring rules know (VLMEvalKit's MMBench has at most four)
CIRCULAR = 1_000_000  # index // CIRCULAR: which rotation; index % CIRCULAR: which question
NO_API_ANSWER = "Failed to obtain answer via API"  # an answer containing this never names a letter (judge leftovers)

NULLABLE_TEXT = (str, float, type(None))  # a string column: None from parquet, NaN from pandas


def samples(rows: Iterable[dict[str, Any]]) -> Iterator[Sample | Skip]:
    return skip_bad_rows("mmbench_en_dev", rows, _sample, "index")


def _sample(row: dict[str, Any], position: int, where: str) -> Sample:
    f = read_fields(row, where, {"index": (int, str), "question": str, "hint": NULLABLE_TEXT, "answer": str,
                                 "category": str, "L2-category": str, "image": object})
    index = f["index"]
    if isinstance(index, str):  # an index written as text: the number it spells, or the row is bad
        if not index.strip().isdecimal():
            raise RowError(f"the field 'index' should be an integer, got {index!r}")
        index = int(index)
    options = {}
    for letter in PROMPT_LETTERS:
        if letter in row:
            options[letter] = read_fields(row, where, {letter: NULLABLE_TEXT})[letter]
    image: Image.Image = rgb_image(row["image"], "image")
    return Sample(id=str(f["index"]), images=[image], prompt=_prompt(f["question"], f["hint"], options),
                  references=f["answer"],
                  extra={"index": index, "category": f["category"], "l2_category": f["L2-category"],
                         # what the scoring rules see: a column the data lacks reads as the text "nan", as lmms-eval's
                         # process_results fills it (and that "nan" is then an option like any other)
                         "options": {c: None if is_missing(v := options.get(c, "nan")) else v for c in SCORED_LETTERS}})


def _prompt(question: str, hint: Any, options: dict[str, Any]) -> str:
    # an option is shown when it is set: not empty, not null, not the text "nan" (how the TSV marked a blank)
    lines = "".join(f"{c}. {v}\n" for c, v in options.items() if v and not is_missing(v) and v != "nan")
    # the strip removes every trailing newline, one that ends the last option's own text included
    block = f"{OPTIONS_HEADER}\n{lines}".rstrip("\n")
    has_hint = not is_missing(hint) and hint != "nan"
    query = f"{hint} {question} {block}" if has_hint else f"{question} {block}"
    return f"{query}\n{POST_PROMPT}"


def letter_by_form(answer: str) -> str | None:
    """The MMBench rule for a letter written as an option (VLMEvalKit's can_infer_option): the one word of the answer
    that is a bare letter A-E, else the one word that is a letter wrapped as "X.", "(X)", ":X", ... . A lone "A"
    in a longer answer (over three words) may be the article, so that case goes on to the wrapped forms."""
    if NO_API_ANSWER in answer:
        return None
    words = answer.split()
    bare = [c for c in PROMPT_LETTERS if c in words]
    if len(bare) == 1 and not ("A" in words and len(words) > 3):
        return bare[0]
    for before, after in (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."),
                          (":", ""), (":", ","), (":", "."), (":", ")"), (":", ").")):
        wrapped = [c for c in PROMPT_LETTERS if before + c + after in words]
        if len(wrapped) == 1:
            return wrapped[0]
    return None


def letter_by_text(answer: str, options: dict[str, Any]) -> str | None:
    """The MMBench rule for an answer that quotes an option: the one option whose text (lowercased) the lowercased
    answer contains; none when no option or several do."""
    answer = answer.lower()
    found = [c for c, text in options.items() if str(text).lower() in answer]
    return found[0] if len(found) == 1 else None


def score(sample: Sample, prediction: str) -> dict[str, Any]:
    prediction = prediction.strip()
    options = {c: v for c, v in sample.extra["options"].items() if v is not None}
    letter = letter_by_form(prediction) or letter_by_text(prediction, options) or extract_letter(prediction,
                                                                                                  sorted(options))
    return {"index": sample.extra["index"], "category": sample.extra["category"],
            "l2_category": sample.extra["l2_category"], "answer": sample.references, "letter": letter or "",
            "hit": int(bool(letter) and letter == sample.references)}


def aggregate(scores: list[dict[str, Any]]) -> dict[str, float]:
    # a question is right when all of its copies are (a copy whose original is absent counts for nothing)
    all_right: dict[int, bool] = defaultdict(lambda: True)
    for s in scores:
        all_right[s["index"] % CIRCULAR] &= bool(s["hit"])
    originals = [s for s in scores if s["index"] < CIRCULAR]
    result = {"gpt_eval_score": _percent([all_right[s["index"]] for s in originals])}
    for key, prefix in (("category", "category/"), ("l2_category", "l2_category/")):
        groups: dict[str, list[bool]] = defaultdict(list)
        for s in originals:
            groups[s[key]].append(all_right[s["index"]])
        result.update({prefix + name: _percent(hits) for name, hits in sorted(groups.items())})
    return result


def _percent(hits: list[bool]) -> float:
    return sum(hits) / len(hits) * 100 if hits else float("nan")


TASK = Task(
    name="mmbench_en_dev",
    hub_dataset="lmms-lab-encoder/MMBench",
    hub_config="en",
    split="dev",
    metrics=("gpt_eval_score",),  # lmms-eval's name, in the static variant too; aggregate adds category/<name>, ...
    samples=samples,
    score=score,
    aggregate=aggregate,
    max_new_tokens=1024,
    description="MMBench English dev: circular multiple choice, option letter matched by rules (no judge model), %",
)
