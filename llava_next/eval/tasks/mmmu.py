"""MMMU, validation split (mmmu_val): college-level questions over 30 subjects, multiple choice and open answers,
scored by MMMU's own answer parsers as lmms-eval runs them.

Prompt: the question (its "<image N>" references stay in the text, as lmms-eval leaves them for LLaVA: its
interleaved format is off), then for multiple choice the "A. text" option lines, a blank line and the instruction to
answer with the letter; for an open question a blank line and the instruction to answer in a word or phrase.
Images: every image the question or its options reference, image_1 before image_2 ..., each once, whatever order
the text names them in (lmms-eval's doc_to_visual sorts them).

Scoring: a multiple-choice answer is parsed to one letter ("(B)", then "B ", then "B.", then, in answers of more than
five words, an option's text; the rightmost when several), and an answer naming none is a random letter (lmms-eval
draws from Python's global generator; here a generator seeded by the question id, so runs repeat). An open answer is
cut to the parts after "is", "so", "answer", "=", ..., plus every number in them, and is right when one part contains
the normalized gold answer (or equals it as a number rounded to 2 decimals). Accuracy is per subject (taken from the
id: validation_<Subject>_<n>), per field, and overall as the mean over all questions, as fractions rounded to 5 places.
"""

from __future__ import annotations

import ast
import math
import random
import re
from collections import defaultdict
from typing import Any, Iterable, Iterator

from .base import RowError, Sample, Skip, Task, rgb_image
from .choices import lettered_options, option_letters, read_fields, skip_bad_rows, strip_each

MULTIPLE_CHOICE = "multiple-choice"  # any other question_type is scored as open
CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."
OPEN_PROMPT = "Answer the question using a single word or phrase."
IMAGE_REFERENCE = re.compile(r"<image \d+>")
IMAGE_COLUMNS = tuple(f"image_{n}" for n in range(1, 8))

# the fields lmms-eval reports "Overall-<field>" for, and their subjects (MMMU's grouping)
FIELDS = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                            "Pharmacy", "Public_Health"),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": ("Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                             "Energy_and_Power", "Materials", "Mechanical_Engineering"),
}


def samples(rows: Iterable[dict[str, Any]]) -> Iterator[Sample | Skip]:
    return skip_bad_rows("mmmu_val", rows, _sample, "id")


def _sample(row: dict[str, Any], position: int, where: str) -> Sample:
    f = read_fields(row, where, {"id": str, "question": str, "options": str, "answer": str, "question_type": str})
    subject = subject_of(f["id"])
    multiple_choice = f["question_type"] == MULTIPLE_CHOICE
    options: list[str] = []
    if multiple_choice:
        options = _options(f["options"])
    # the images come from the question with its options (the instructions reference none)
    images = []
    for name in sorted({ref.strip("<>").replace(" ", "_") for ref in IMAGE_REFERENCE.findall(_text(f, options))}):
        if name not in row:
            if name in IMAGE_COLUMNS:
                read_fields(row, where, {name: object})  # the column itself is missing: the data's schema is wrong
            raise RowError(f"the question references <{name.replace('_', ' ')}>, which the data does not have")
        images.append(rgb_image(row[name], name))
    prompt = _text(f, options, CHOICE_PROMPT if multiple_choice else OPEN_PROMPT)
    return Sample(id=f["id"], images=images, prompt=prompt, references=f["answer"],
                  extra={"subject": subject, "question_type": f["question_type"], "options": options})


def _options(text: str) -> list[str]:
    # the dataset stores the option list as the text of a Python list
    try:
        options = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        raise RowError(f"the field 'options' is not a Python list: {text[:80]!r}") from None
    if not isinstance(options, (list, tuple)) or not options or not all(isinstance(o, str) for o in options):
        raise RowError(f"the field 'options' should be a non-empty list of strings, got {text[:80]!r}")
    return list(options)


def _text(f: dict[str, Any], options: list[str], instruction: str = "") -> str:
    if f["question_type"] == MULTIPLE_CHOICE:
        return f"{f['question']}\n{lettered_options(options)}\n\n{instruction}"
    return f"{f['question']}\n\n{instruction}"


def subject_of(question_id: str) -> str:
    """validation_Art_Theory_12 -> Art_Theory: what lies between the first word and the final number."""
    split = question_id.split("_")[0]
    match = re.match(rf"{re.escape(split)}_(.+?)_\d+$", question_id)
    if not match:
        raise RowError(f"the id {question_id!r} is not <split>_<Subject>_<number>, so it names no subject")
    return match.group(1)


# --- multiple choice ---------------------------------------------------------------------------------------------

def parse_choice(answer: str, options: list[str]) -> str | None:
    """The letter a multiple-choice answer names by MMMU's rules, or None when it names none."""
    letters = option_letters(len(options))
    text = " " + strip_each(answer, ",.!?;:'") + " "
    by_text = False
    found = [c for c in letters if f"({c})" in text]
    in_parentheses = bool(found)
    for form in ("{} ", "{}."):
        if not found:
            found = [c for c in letters if form.format(c) in text]
    if not found and len(text.split()) > 5:  # a longer answer may quote an option instead of naming its letter
        found = [c for c, option in zip(letters, options) if option.lower() in text.lower()]
        by_text = True
    if len(found) <= 1:
        return found[0] if found else None
    # several: the one that appears last (the first of equals), measured in the form that picks it out
    if by_text:
        places = [text.lower().rfind(options[letters.index(c)].lower()) for c in found]
    else:
        places = [text.rfind(f"({c})" if in_parentheses else f" {c} ") for c in found]
    return found[places.index(max(places))]


# --- open questions ----------------------------------------------------------------------------------------------

KEY_MARKERS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
TRIVIAL = (":", ",", ".", "!", "?", ";", "'")
NUMBER_WITH_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
NUMBER_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
NUMBER_PLAIN = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")


def normalize(text: str) -> list[str | float]:
    """MMMU's normal form of an answer: a number (commas dropped, rounded to 2 decimals), or the lowercased text;
    a single character becomes " c" and "c " so that it only matches as a word of its own."""
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]  # what Python's float() reads: "1e3", "nan", "1_000", ...
    except ValueError:
        text = text.lower()
        return [" " + text, text + " "] if len(text) == 1 else [text]


def parse_open(answer: str) -> list[str | float]:
    """The candidate answers MMMU reads from an open answer, normalized, without repeats (first seen first)."""
    answer = answer.strip().strip(".").lower()
    # MMMU also splits at ". " before a capital letter, which never occurs once the answer is lowercased
    lines = answer.split("\n")
    keys = []
    for i, line in enumerate(lines):
        markers = KEY_MARKERS + ("=",) if i == len(lines) - 1 else KEY_MARKERS  # an equation only ends the answer
        shortest = None  # the shortest tail after a marker: the part most likely to be the answer itself
        for marker in markers:
            if marker in line:
                tail = line.split(marker)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in TRIVIAL:
            keys.append(shortest)
    keys = keys or [answer]
    numbers = [n for key in keys for pattern in (NUMBER_WITH_COMMAS, NUMBER_SCIENTIFIC, NUMBER_PLAIN)
               for n in pattern.findall(key)]
    return list(dict.fromkeys(value for part in keys + numbers for value in normalize(part)))


def open_is_right(gold: str, candidates: list[str | float]) -> bool:
    golds = normalize(gold)
    for candidate in candidates:
        if isinstance(candidate, str):  # text: right when it contains a text form of the gold answer
            if any(isinstance(g, str) and g in candidate for g in golds):
                return True
        elif candidate in golds:  # a number: right when equal (NaN never is)
            return True
    return False


# --- per question, and in total ----------------------------------------------------------------------------------

def score(sample: Sample, prediction: str) -> dict[str, Any]:
    prediction = prediction.strip()
    result = {"id": sample.id, "subject": sample.extra["subject"], "question_type": sample.extra["question_type"],
              "answer": sample.references}
    if sample.extra["question_type"] == MULTIPLE_CHOICE:
        letter = parse_choice(prediction, sample.extra["options"])
        if letter is None:  # MMMU guesses when the answer names no letter
            letter = random.Random(sample.id).choice(option_letters(len(sample.extra["options"])))
            result["guessed"] = True
        result.update(parsed=letter, correct=int(letter == sample.references))
    else:
        candidates = parse_open(prediction)
        # JSON has no NaN or infinity: such a candidate is kept as its text (it can never be right anyway)
        result.update(parsed=[c if isinstance(c, str) or math.isfinite(c) else str(c) for c in candidates],
                      correct=int(open_is_right(sample.references, candidates)))
    return result


def aggregate(scores: list[dict[str, Any]]) -> dict[str, float]:
    by_subject: dict[str, list[int]] = defaultdict(list)  # in the order subjects first appear, as lmms-eval sums
    for s in scores:
        by_subject[s["subject"]].append(s["correct"])
    accuracy = {subject: (sum(c) / len(c), len(c)) for subject, c in by_subject.items()}
    result = {"mmmu_acc": round(_mean_of_means(accuracy.values()), 5)}
    for field, subjects in FIELDS.items():
        present = [accuracy[s] for s in subjects if s in accuracy]
        if present:
            result[f"mmmu_acc/Overall-{field}"] = round(_mean_of_means(present), 5)
    result.update({f"mmmu_acc/{subject}": round(acc, 5) for subject, (acc, _) in accuracy.items()})
    return result


def _mean_of_means(groups: Iterable[tuple[float, int]]) -> float:
    """The accuracy over all questions of some groups, from each group's accuracy and size (MMMU's arithmetic:
    sum(accuracy x size) / sum(size), which is how lmms-eval gets its floating-point digits)."""
    total, count = 0.0, 0
    for acc, n in groups:
        total += acc * n
        count += n
    return total / count if count else 0.0


TASK = Task(
    name="mmmu_val",
    hub_dataset="lmms-lab-encoder/MMMU",
    hub_config=None,
    split="validation",
    metrics=("mmmu_acc",),  # plus mmmu_acc/<Subject> and mmmu_acc/Overall-<field>
    samples=samples,
    score=score,
    aggregate=aggregate,
    max_new_tokens=128,
    description="MMMU validation: college-level multiple choice and open questions, MMMU's parsers (fraction)",
)
