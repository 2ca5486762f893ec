"""Records -> training samples: token ids with labels, validated before training starts.

Two formats:
  plain  (stage 1)  BOS, the image, the caption, EOS; loss on the caption and EOS.
  chat   (stage 2)  the conversation rendered with the model's own chat template; loss on each assistant reply and
                    its end-of-turn token only, never on the system prompt, the user turns or the images.

The assistant replies are found by rendering the conversation turn by turn: the reply is what a turn adds after
the prompt that asks for it (the template's generation prompt). Tokens are assigned to replies by their character
offsets; a token that joins template text to the start of a reply makes the alignment ambiguous, which is an error
naming the sample (one that only joins the template's white space to the reply, as Llama-3's "\n\n" + "\n" does,
belongs to the reply). Templates that write no end-of-turn token after a reply (the llava-hf vicuna one) get the EOS token
appended there, as the original LLaVA training format has it, so the model learns to stop.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..data.records import DataError, Record
from ..image import ImageError, image_size
from ..processor import Processor
from ..prompt import IMAGE_TOKEN, PromptError

IGNORE_INDEX = -100


@dataclass
class Sample:
    id: str
    input_ids: list[int]  # image placeholders already expanded
    labels: list[int]  # IGNORE_INDEX where no loss
    images: list[Path]
    image_sizes: list[tuple[int, int]]  # (height, width)

    @property
    def modality_length(self) -> int:
        """Length for the grouped sampler: negative for text-only samples, so the two kinds never share a batch."""
        return len(self.input_ids) if self.images else -len(self.input_ids)


@dataclass
class ValidationReport:
    total: int
    samples: list[Sample]
    dropped: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # reason -> record ids

    @property
    def dropped_count(self) -> int:
        return sum(len(ids) for ids in self.dropped.values())

    def summary(self) -> str:
        lines = [f"{self.total} records: {len(self.samples)} kept, {self.dropped_count} dropped"]
        for reason, ids in sorted(self.dropped.items()):
            shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
            lines.append(f"  {len(ids)} {reason}: {shown}")
        return "\n".join(lines)


class SampleEncoder:
    def __init__(self, processor: Processor, eos_token_ids: Sequence[int], data_format: str, max_length: int):
        if data_format not in ("plain", "chat"):
            raise DataError(f"data format must be 'plain' (stage 1) or 'chat' (stage 2), not {data_format!r}")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.eos_token_ids = list(eos_token_ids)
        if not self.eos_token_ids:
            raise DataError("the model has no EOS token, so it could not learn to stop; set eos_token_id in its config")
        self.format = data_format
        self.max_length = max_length
        self.template = processor.chat_template

    # -- the two formats ---------------------------------------------------------------------------------------------

    def _encode_plain(self, record: Record) -> tuple[list[int], list[int]]:
        replies = [text for role, text in record.turns if role == "assistant"]
        if len(replies) != 1:
            raise _Drop("not one caption (plain format takes one human and one gpt turn)")
        text = IMAGE_TOKEN * len(record.images) + replies[0]
        ids = self.tokenizer.encode(text) + [self.eos_token_ids[0]]
        first_caption = max((i for i, t in enumerate(ids) if t == self.tokenizer.image_token_id), default=-1) + 1
        if first_caption == 0 and record.images:
            raise _Drop("image count mismatch")
        labels = [IGNORE_INDEX] * first_caption + ids[first_caption:]
        return ids, labels

    def _encode_chat(self, record: Record) -> tuple[list[int], list[int]]:
        messages = record.messages()
        render = self.template.render
        full = render(messages, add_generation_prompt=False).text
        spans = []
        for i, (role, _) in enumerate(record.turns):
            if role != "assistant":
                continue
            prompt = render(messages[:i], add_generation_prompt=True).text
            upto = render(messages[: i + 1], add_generation_prompt=False).text
            if not (upto.startswith(prompt) and full.startswith(upto) and len(upto) > len(prompt)):
                raise DataError(
                    f"record {record.id}: the chat template ({self.template.origin}) does not render reply {len(spans)} "
                    "as an extension of the prompt before it, so the loss cannot be put on the reply alone"
                )
            spans.append((len(prompt), len(upto)))
        encoding = self.tokenizer.backend.encode(full, add_special_tokens=not self.tokenizer.starts_with_bos(full))
        ids, offsets = list(encoding.ids), list(encoding.offsets)
        labels = [IGNORE_INDEX] * len(ids)
        insert_eos_at = []
        eos = set(self.eos_token_ids)
        for reply, (start, end) in enumerate(spans):
            # The separator a template writes after a reply (a space, a newline) is not the reply's to predict.
            end = start + len(full[start:end].rstrip())
            inside = []
            for j, (a, b) in enumerate(offsets):
                if b <= a or b <= start or a >= end:
                    continue  # zero-width (a BOS the post-processor adds) or outside the reply
                if a < start and full[a:start].strip():
                    raise DataError(
                        f"record {record.id}: token {self.tokenizer.decode([ids[j]], False)!r} joins template text "
                        f"and the start of reply {reply} into one token, so the reply's "
                        "labels cannot be aligned"
                    )
                inside.append(j)  # a token that only joins white space of the template to the reply is the reply's
            if not inside:
                raise _Drop("empty reply")
            ended = False
            for j in inside:
                labels[j] = ids[j]
                if ids[j] in eos:
                    ended = True
                    break
            if not ended:
                insert_eos_at.append(inside[-1] + 1)
        for position in reversed(insert_eos_at):
            ids.insert(position, self.eos_token_ids[0])
            labels.insert(position, self.eos_token_ids[0])
        return ids, labels

    # -- one record --------------------------------------------------------------------------------------------------

    def encode(self, record: Record, image_sizes: list[tuple[int, int]]) -> Sample:
        """A record whose images are known to load -> a sample; raises _Drop with the reason for a bad record."""
        placeholders = sum(text.count(IMAGE_TOKEN) for role, text in record.turns if role == "user")
        if placeholders != len(record.images) or any(
            IMAGE_TOKEN in text for role, text in record.turns if role != "user"
        ):
            raise _Drop("image count mismatch")
        roles = [role for role, _ in record.turns if role != "system"]
        if not roles or roles[0] != "user" or roles[-1] != "assistant" or any(
            a == b for a, b in zip(roles, roles[1:])
        ):
            raise _Drop("malformed conversation (turns must alternate, human first, gpt last)")
        if any(not text.strip() for role, text in record.turns if role == "assistant"):
            raise _Drop("empty reply")
        ids, labels = self._encode_plain(record) if self.format == "plain" else self._encode_chat(record)
        costs = [self.processor.image_tokens(size) for size in image_sizes]
        ids, labels = _expand_images(ids, labels, self.tokenizer.image_token_id, costs)
        if len(ids) > self.max_length:
            raise _Drop(f"longer than max_length {self.max_length} with its image tokens (answer would be cut off)")
        if all(label == IGNORE_INDEX for label in labels):
            raise _Drop("empty reply")
        return Sample(record.id, ids, labels, list(record.images), list(image_sizes))


class _Drop(Exception):
    """A record that is skipped, with the reason."""


def _expand_images(ids: list[int], labels: list[int], image_id: int, costs: list[int]) -> tuple[list[int], list[int]]:
    """Each image token -> its image's count of placeholder tokens (tokenizing the expanded text gives the same,
    since <image> is an added token that splits the text around it)."""
    positions = [i for i, t in enumerate(ids) if t == image_id]
    if len(positions) != len(costs):
        raise _Drop("image count mismatch")
    out_ids, out_labels, last = [], [], 0
    for position, cost in zip(positions, costs):
        out_ids += ids[last:position] + [image_id] * cost
        out_labels += labels[last:position] + [IGNORE_INDEX] * cost
        last = position + 1
    return out_ids + ids[last:], out_labels + labels[last:]


def validate(records: Sequence[Record], encoder: SampleEncoder, max_bad_fraction: float) -> ValidationReport:
    """Encode every record, dropping bad ones with a reason; fail when more than `max_bad_fraction` are bad."""
    report = ValidationReport(total=len(records), samples=[])
    size_cache: dict[Path, tuple[int, int] | str] = {}
    for record in records:
        sizes, problem = [], None
        for path in record.images:
            if path not in size_cache:
                try:
                    size_cache[path] = image_size(path, encoder.processor.image_limits)  # no full decode
                except ImageError as e:
                    size_cache[path] = "missing image" if "no such image file" in str(e) else "unreadable image"
            if isinstance(size_cache[path], str):
                problem = size_cache[path]
                break
            sizes.append(size_cache[path])
        if problem:
            report.dropped[problem].append(record.id)
            continue
        try:
            report.samples.append(encoder.encode(record, sizes))
        except _Drop as reason:
            report.dropped[str(reason)].append(record.id)
        except PromptError as e:
            raise DataError(f"record {record.id}: {e}") from None
    if report.total == 0:
        raise DataError("the data has no records")
    bad = report.dropped_count / report.total
    if bad > max_bad_fraction:
        raise DataError(
            f"{report.dropped_count} of {report.total} records ({bad:.1%}) are unusable, more than the allowed "
            f"{max_bad_fraction:.1%} (max_bad_fraction):\n{report.summary()}"
        )
    return report
