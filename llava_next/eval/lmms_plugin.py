"""lmms-eval model plugin: `lmms-eval --model llava_next_pkg --model_args pretrained=DIR --tasks pope` runs this
package's engine.

lmms-eval finds the model through the `lmms_eval.models` entry point in pyproject.toml, which names `manifest`
below. This is the only module that imports lmms-eval (`pip install -e '.[eval]'`); nothing else in the package
imports this one.

How lmms-eval's requests become our prompts: every request is one user turn in the transformers chat format, the
document's images first (one `{"type": "image"}` item each) and then the task's text, rendered with the checkpoint's
own chat template, as `llava-next eval` and the original LLaVA evaluation do ("<image>\\n" + question). A task that
writes `<image>` into its text gets those tokens (and the newline or space after each) removed: the images are
always placed before the text.

- generate_until: requests with the same generation settings go to `Pipeline.generate` together, `batch_size` at a
  time; `until` strings stop generation; the answers come back in request order.
- loglikelihood: log P(continuation | context + images) from the model's logits (float32 log-softmax), the context
  rendered as for generate_until and the continuation appended after the generation prompt; the continuation's
  tokens are those of context + continuation past the context's tokens. lmms-eval wants it in the form its own
  models return it: the mean negative log-likelihood per continuation token (transformers' `loss`), which its
  multiple-choice scoring minimises (`np.argmin(lls)` in lmms_eval/api/task.py); `score` gives the plain sum.
- generate_until_multi_round: lmms-eval's multi-round protocol for simple models (the task's doc_to_text is called
  with round_idx and the previous answers, and says when to stop); each round is a fresh single-turn prompt.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from loguru import logger
from lmms_eval.api.instance import GenerationResult, Instance, unwrap_generation_output
from lmms_eval.api.model import lmms
from PIL import Image, ImageFile
from tqdm import tqdm

from ..load_options import DEFAULT_DTYPE, DEFAULT_MODEL
from ..pipeline import Pipeline, load
from ..prompt import user_turn

MODEL_ID = "llava_next_pkg"

# `<image>` as tasks write it (LLaVA's placeholder), with the newline or space a task puts after it
IMAGE_TOKEN = re.compile(r"<image>[ \t]*\n?")

# generation settings of lmms-eval tasks that we read; the rest are reported once and ignored
KNOWN_GEN_KWARGS = {"until", "max_new_tokens", "temperature", "top_p", "top_k", "do_sample", "num_beams",
                    "repetition_penalty"}

# what lmms-eval's own models generate when a task does not say
DEFAULT_MAX_NEW_TOKENS = 1024


def manifest():
    """The entry point's payload: the model id and the class lmms-eval imports. (Imported here: lmms-eval loads the
    entry points while `lmms_eval.models` initialises, which must not start from this module.)"""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.LlavaNextLmms")


def context_messages(context: str, images: Sequence[Image.Image]) -> list[dict[str, Any]]:
    """One lmms-eval context and its images -> chat messages: the images first, then the text, from which the
    `<image>` a task writes is removed (the images are placed by the template)."""
    return [user_turn(IMAGE_TOKEN.sub("", context), len(images))]


def sampling_from(gen_kwargs: dict[str, Any], warned: set[str]) -> dict[str, Any]:
    """lmms-eval generation settings (HF-style) -> Pipeline.generate keyword arguments."""
    unknown = sorted(set(gen_kwargs) - KNOWN_GEN_KWARGS - warned)
    if unknown:
        logger.warning(f"{MODEL_ID}: ignoring generation settings {unknown}")
        warned.update(unknown)
    if (gen_kwargs.get("num_beams") or 1) > 1 and "num_beams" not in warned:
        logger.warning(f"{MODEL_ID}: beam search is not implemented; num_beams={gen_kwargs['num_beams']} decodes "
                       "greedily (or samples, with do_sample), so scores may differ from a beam-search run")
        warned.add("num_beams")
    until = gen_kwargs.get("until") or []
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, (list, tuple)) or not all(isinstance(s, str) for s in until):
        raise ValueError(f"gen_kwargs['until'] must be a string or a list of strings, got {until!r}")
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    if gen_kwargs.get("do_sample") is False:
        temperature = 0.0  # transformers' meaning: do_sample=False is greedy whatever the temperature
    out: dict[str, Any] = {
        "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
        "temperature": temperature,
        "stop": [s for s in until if s],
    }
    for name, cast in (("top_p", float), ("top_k", int)):  # (greedy decoding ignores them)
        if gen_kwargs.get(name) is not None:
            out[name] = cast(gen_kwargs[name])
    if gen_kwargs.get("repetition_penalty") is not None:
        out["repetition_penalty"] = float(gen_kwargs["repetition_penalty"])
    return out


@contextlib.contextmanager
def strict_decoding() -> Iterator[None]:
    """lmms-eval turns on PIL's LOAD_TRUNCATED_IMAGES for the whole process (lmms_eval/api/task.py), which our image
    checks refuse. The documents' images are decoded under lmms-eval's setting (`LlavaNextLmms._check_images`),
    as lmms-eval's own models see them; our pipeline then runs with the setting off, so nothing of ours decodes
    a truncated file, and lmms-eval's setting is restored after."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def pairs_survive_the_evaluator() -> bool:
    """Whether lmms-eval's evaluator keeps a (log-probability, is-greedy) pair as the model returned it. lmms-eval
    0.7.3 passes every model output through `unwrap_generation_output`, which turns such a tuple into its string,
    and then multiple-choice scoring fails (`lls, is_greedy = zip(*results)`) for every model. A GenerationResult's
    `text` passes through untouched, so there the pairs travel inside one."""
    return unwrap_generation_output((-1.0, True))[0] == (-1.0, True)


def continuation_logprob(logprobs: torch.Tensor, targets: torch.Tensor) -> tuple[float, int, bool]:
    """logprobs (n, V) at the positions that predict `targets` (n,) -> (sum of their log-probabilities, n, whether
    each target is the argmax)."""
    if targets.numel() == 0:
        return 0.0, 0, True
    picked = logprobs.gather(-1, targets[:, None])[:, 0]
    return float(picked.sum()), targets.numel(), bool((logprobs.argmax(-1) == targets).all())


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class LlavaNextLmms(lmms):
    """An lmms-eval model on `llava_next.load`: pretrained (a directory, a Hub id or "demo"), dtype, device,
    quantize (int8, int4, w8a8), group_size, batch_size (requests answered together). From Python, `pipeline=`
    gives an already loaded Pipeline instead."""

    is_simple = True

    def __init__(self, pretrained: str = DEFAULT_MODEL, dtype: str = DEFAULT_DTYPE, device: str | None = None,
                 quantize: str | None = None, group_size: int | str | None = None, batch_size: int | str = 1,
                 max_batch_size: int | None = None, pipeline: Pipeline | None = None, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise TypeError(f"{MODEL_ID}: unknown model_args {sorted(unknown)}; it takes pretrained, dtype, device, "
                            "quantize, group_size and batch_size")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError(f"{MODEL_ID} runs in one process; for several GPUs use `llava-next eval` under torchrun")
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            batch_size = max_batch_size or 8  # the engine batches continuously; no search for a size is needed
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if isinstance(quantize, str) and quantize.lower() in ("", "none"):
            quantize = None
        if isinstance(group_size, str) and group_size.lower() in ("", "none"):
            group_size = None  # (lmms-eval passes model_args' values as strings)
        if group_size is not None:
            group_size = int(group_size)
        self.pipe = pipeline if pipeline is not None else load(
            str(pretrained), dtype=dtype, device=device, quantize=quantize, group_size=group_size, progress=False)
        self._device = self.pipe.model.device
        self._warned: set[str] = set()

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "LlavaNextLmms":
        """As lmms-eval's, but an option given in model_args wins over the one lmms-eval passes from its command
        line (--batch_size, which it always passes, and --device): lmms-eval's own passes both, and fails."""
        from lmms_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        more = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **more)

    # the attributes lmms-eval's evaluator and loggers read
    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def model(self) -> torch.nn.Module:
        return self.pipe.model

    # -- documents ---------------------------------------------------------------------------------------------------

    def _images(self, doc_to_visual, task: str, split: str, doc_id: int) -> list[Image.Image]:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        return self._check_images(visuals, f"{task}, document {doc_id}")

    @staticmethod
    def _check_images(visuals, where: str) -> list[Image.Image]:
        visuals = [v for v in (visuals or []) if v is not None]
        for v in visuals:
            if not isinstance(v, Image.Image):
                raise TypeError(f"{where}: {MODEL_ID} takes images only, got a "
                                f"{type(v).__name__} ({str(v)[:80]!r}); video and audio tasks are not supported")
            v.load()  # the pixels as lmms-eval decodes them (see strict_decoding)
        return visuals

    # -- generate_until ----------------------------------------------------------------------------------------------

    def _answer(self, prompts: list[tuple[str, list[Image.Image]]], gen_kwargs: dict[str, Any]) -> list[str]:
        """(context, images) pairs that share generation settings -> answers, `batch_size` prompts at a time."""
        sampling = sampling_from(gen_kwargs, self._warned)
        answers: list[str] = []
        for first in range(0, len(prompts), self.batch_size):
            chunk = prompts[first : first + self.batch_size]
            with strict_decoding():
                generations = self.pipe.generate([context_messages(c, ims) for c, ims in chunk],
                                                 [ims for _, ims in chunk], **sampling)
            answers.extend(g.text for g in generations)
        return answers

    def generate_until(self, requests: list[Instance]) -> list[str]:
        groups: dict[str, list[int]] = {}  # same settings -> request indices, in request order
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        results: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc=f"{MODEL_ID} generate_until")
        for indices in groups.values():
            gen_kwargs = dict(requests[indices[0]].args[1])
            for first in range(0, len(indices), self.batch_size):
                chunk = indices[first : first + self.batch_size]
                prompts = []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    prompts.append((context, self._images(doc_to_visual, task, split, doc_id)))
                for i, answer in zip(chunk, self._answer(prompts, gen_kwargs)):
                    results[i] = answer
                    self.cache_hook.add_partial("generate_until", (requests[i].args[0], gen_kwargs), answer)
                bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    # -- loglikelihood -----------------------------------------------------------------------------------------------

    def _request_parts(self, request: Instance) -> tuple[str, str, list[Image.Image]]:
        args = request.args
        if len(args) == 2:  # the unconditional requests of acc_mutual_info: no context, no images
            return args[0], args[1], []
        context, target, doc_to_visual, doc_id, task, split = args
        if callable(target):
            target = target(self.task_dict[task][split][doc_id])
        if isinstance(target, (list, tuple)):
            target = target[0]
        return context, str(target), self._images(doc_to_visual, task, split, doc_id)

    @torch.inference_mode()
    def score(self, items: list[tuple[str, str, list[Image.Image]]]) -> list[tuple[float, int, bool]]:
        """(context, continuation, images) -> (log P(continuation | prompt), the continuation's token count, whether
        it is the greedy continuation), the prompt being the context with its images rendered by the chat template
        with the generation prompt; all items in one forward pass."""
        processor, model = self.pipe.processor, self.pipe.model
        prompts = [self.pipe.prompt_text(context_messages(c, ims), ims)[0] for c, _, ims in items]
        inputs = processor([p + c for p, (_, c, _) in zip(prompts, items)], [im for *_, ims in items for im in ims],
                           padding_side="left")
        wholes = [row[mask.bool()].tolist() for row, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
        # the continuation's tokens: those past the prompt's own tokens (where the two merge into one token at the
        # boundary, from that token on)
        counts = [len(whole) - common_prefix(processor(p, ims)["input_ids"][0].tolist(), whole)
                  for p, whole, (_, _, ims) in zip(prompts, wholes, items)]
        keep = max(counts) + 1
        logits = self.pipe.engine.forward(**{k: v.to(model.device) for k, v in inputs.items()},
                                          logits_to_keep=keep)  # (B, keep, V)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        out = []
        for row, (whole, n) in enumerate(zip(wholes, counts)):
            # rows end together (left padding); logits at position p predict token p + 1
            targets = torch.tensor(whole[len(whole) - n :], device=logprobs.device)
            out.append(continuation_logprob(logprobs[row, keep - n - 1 : keep - 1], targets))
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(mean negative log-likelihood per continuation token, is-greedy) per request: the convention of
        lmms-eval's models and scoring (see the module's docstring). Each pair travels inside a GenerationResult
        where this lmms-eval would otherwise turn it into a string (`pairs_survive_the_evaluator`)."""
        items = [self._request_parts(r) for r in requests]
        results: list[tuple[float, bool]] = []
        bar = tqdm(total=len(items), disable=self.rank != 0, desc=f"{MODEL_ID} loglikelihood")
        for first in range(0, len(items), self.batch_size):
            chunk = items[first : first + self.batch_size]
            with strict_decoding():
                results.extend((-total / n if n else 0.0, greedy) for total, n, greedy in self.score(chunk))
            bar.update(len(chunk))
        bar.close()
        if not pairs_survive_the_evaluator():
            return [GenerationResult(text=pair) for pair in results]  # type: ignore[arg-type, misc]
        return results

    # -- generate_until_multi_round ----------------------------------------------------------------------------------

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Each request's rounds: round 0 asks the context with doc_to_visual's images; after each answer the task's
        doc_to_text(doc, previous_output=..., round_idx=..., previous_round_info=...) returns the next round's
        (images, text, done, answers so far, round info). The result per request is its list of answers. All
        unfinished requests of a round are answered together (grouped by generation settings)."""
        conversations = []
        for request in requests:
            if len(request.args) != 7:
                raise NotImplementedError(f"{MODEL_ID}: multi-round requests of this shape ({len(request.args)} "
                                          "arguments) come from chat-style tasks, which this simple model does not run")
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
            conversations.append(_Rounds(gen_kwargs, self.task_dict[task][split][doc_id], doc_to_text, context,
                                         self._images(doc_to_visual, task, split, doc_id), f"{task}, document {doc_id}"))
        active, round_idx = list(conversations), 0
        while active:
            groups: dict[str, list[_Rounds]] = {}
            for c in active:
                groups.setdefault(json.dumps(c.gen_kwargs, sort_keys=True, default=str), []).append(c)
            for group in groups.values():
                for c, answer in zip(group, self._answer([(c.context, c.images) for c in group], dict(group[0].gen_kwargs))):
                    c.answers.append(answer)
            round_idx += 1
            for c in active:
                images, context, c.done, answers, c.info = c.doc_to_text(
                    c.doc, previous_output=list(c.answers), round_idx=round_idx, previous_round_info=c.info)
                c.answers = list(answers or [])
                if not c.done:
                    c.images, c.context = self._check_images(images, c.where), context
            active = [c for c in active if not c.done]
        return [c.answers for c in conversations]


@dataclass
class _Rounds:
    """One multi-round request as it goes."""

    gen_kwargs: dict[str, Any]
    doc: Any
    doc_to_text: Any  # the task's (doc, previous_output, round_idx, previous_round_info) -> the next round
    context: str  # this round's text
    images: list[Image.Image]  # this round's images
    where: str  # for error messages
    answers: list[str] = field(default_factory=list)
    info: Any = None  # the task's round info, handed back to it
    done: bool = False
