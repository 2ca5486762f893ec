"""What the open-ended VQA tasks (vqav2_val, textvqa_val, docvqa_val, chartqa) share: the VQA answer normalisation
and accuracy, lmms-eval's handling of a generated answer, the mean it aggregates with, and the reading of rows that
hold one image, one question and the reference answer(s).

VQA accuracy: an answer is right in proportion to how many of the 10 annotators gave it, min(#matches / 3, 1),
averaged over the 10 ways of leaving one annotator out (the official VQA evaluation). Before comparing, answers are
normalised as the VQA evaluation script does (punctuation, then number words, articles and contractions); TextVQA
goes through EvalAI's answer processor, which lower-cases and drops commas and question marks first.
"""

from __future__ import annotations

import re
import statistics
from typing import Any, Callable, Iterable, Iterator

from .base import RowError, Sample, Skip, TaskDataError, field_of, rgb_image

# -- normalisation ------------------------------------------------------------------------------------------------

# Each of these becomes a space, or disappears when it touches a space in the text (or when the text has a comma
# between digits anywhere): "yes/no" -> "yes no", "(red)" -> "red".
_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'  # the period has its own rule, below
_DIGIT_COMMA_DIGIT = re.compile(r"\d,+\d")
# A period not followed by a digit goes ("3.5" keeps its period). The scripts lmms-eval copies pass re.UNICODE where
# re.sub takes its count, so only the first 32 such periods go; kept, so scores match.
_PERIOD = re.compile(r"\.(?!\d)")
_PERIODS_REMOVED = 32  # int(re.UNICODE)

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                 "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}

# The contractions the evaluation restores: typed with one of the apostrophes left out ("dont", "couldnt've",
# "couldn'tve"), a word becomes the full form. One entry of the original table goes the other way
# ("somebody'd" -> "somebodyd"); kept, so scores match.
_CONTRACTED_FORMS = """
    'ow's'at 'twas ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
    haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am might've mightn't mightn't've must've
    mustn't needn't not've o'clock oughtn't shan't she'd've should've shouldn't shouldn't've somebody'd've
    somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll
    that's there'd there'd've there're there's they'd they'd've they'll they're they've wasn't we'd've we've weren't
    what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're
    why's won't would've wouldn't wouldn't've y'all y'all'd've y'all'll you'd you'd've you'll you're you've
""".split()
_CONTRACTIONS = {form[:i] + form[i + 1:]: form
                 for form in _CONTRACTED_FORMS for i, char in enumerate(form) if char == "'"}
_CONTRACTIONS["somebody'd"] = "somebodyd"


def _punctuation(text: str) -> str:
    glued = _DIGIT_COMMA_DIGIT.search(text) is not None
    table = {ord(p): "" if glued or f"{p} " in text or f" {p}" in text else " " for p in _PUNCTUATION}
    return _PERIOD.sub("", text.translate(table), count=_PERIODS_REMOVED)


def _words(text: str) -> str:
    """Lower-case; number words to digits; articles out; contractions restored."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def vqa_answer(text: str) -> str:
    """An answer as the VQA evaluation compares it (lmms-eval's vqav2): line breaks and tabs are spaces, then
    punctuation, number words, articles and contractions."""
    return _words(_punctuation(text.replace("\n", " ").replace("\t", " ").strip()))


def evalai_answer(text: str) -> str:
    """An answer as EvalAI's answer processor compares it (lmms-eval's textvqa): lower-cased, commas and question
    marks removed, "'s" split off as a word, then as `vqa_answer`."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return vqa_answer(text)


def vqa_accuracy(prediction: str, answers: list[Any], annotators: list[Any] | None = None) -> float:
    """min(#matches / 3, 1) averaged over leaving each annotator out. `prediction` and `answers` are normalised
    already. `annotators` says who gave each answer (default: each answer its own annotator); leaving one out leaves
    out every answer whose annotator compares equal to it (lmms-eval's vqav2 compares whole annotation records)."""
    annotators = list(range(len(answers))) if annotators is None else annotators
    per_left_out = []
    for left_out in annotators:
        matches = sum(1 for answer, who in zip(answers, annotators) if who != left_out and answer == prediction)
        per_left_out.append(min(1.0, matches / 3))
    return statistics.mean(per_left_out)  # exact (fractions inside), as lmms-eval computes it


# -- what lmms-eval does around every task ------------------------------------------------------------------------


def mean_over_samples(scores: list[dict[str, Any]], metrics: Iterable[str]) -> dict[str, float]:
    """lmms-eval's "mean" aggregation, metric by metric over the samples that report it (ChartQA reports each split's
    metric on that split's samples only); a metric no sample reports is left out, as lmms-eval leaves it out."""
    out = {}
    for metric in metrics:
        values = [score[metric] for score in scores if metric in score]
        if values:
            out[metric] = sum(values) / len(values)
    return out


# -- rows ---------------------------------------------------------------------------------------------------------


def question_samples(rows: Iterable[dict[str, Any]], task: str, *, id_field: str | None, fields: tuple[str, ...],
                     prompt: Callable[[str], str], references: Callable[[dict[str, Any], str], Any],
                     extra: Callable[[dict[str, Any]], dict[str, Any]] = lambda row: {}) -> Iterator[Sample | Skip]:
    """Rows with an "image", a "question" and the reference answer(s) -> one Sample each, in order.

    `fields`: the other fields the task reads; a row without one of them (or without "image" or "question") is a file
    of another schema, a TaskDataError. `id_field`: the row's id (None: the row's position, which is what lmms-eval
    calls the document). `references(row, where)` returns what the metric compares with, raising TaskDataError when
    the row's value cannot be scored; that, a question that is not a string or an image that does not decode makes
    the row a Skip with the reason. The image is converted to RGB, as every one of these tasks' doc_to_visual does.
    """
    for index, row in enumerate(rows):
        where = f"{task} row {index}"
        for name in ("image", "question", *fields, *((id_field,) if id_field else ())):
            field_of(row, name, where)
        sample_id = str(row[id_field]) if id_field else str(index)
        try:
            question = field_of(row, "question", where, str)
            answers = references(row, where)
            image = rgb_image(row["image"], where)
        except (TaskDataError, RowError) as e:
            yield Skip(sample_id, str(e))
            continue
        yield Sample(id=sample_id, images=[image], prompt=prompt(question), references=answers, extra=extra(row))


def answer_list(row: dict[str, Any], where: str, name: str = "answers") -> list[str]:
    """row[name] as a non-empty list of strings (TextVQA's and DocVQA's answers)."""
    answers = field_of(row, name, where, (list, tuple))
    if not answers:
        raise TaskDataError(f"{where}: the field {name!r} is empty: nothing to score against")
    if not all(isinstance(answer, str) for answer in answers):
        raise TaskDataError(f"{where}: the field {name!r} should hold strings only")
    return list(answers)
