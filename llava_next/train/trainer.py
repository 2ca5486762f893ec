"""The training loop: one process or many (torchrun, FSDP), resumable to the same result.

A run's global batch is batch_size x grad_accum x world_size samples, drawn in an order fixed by the seed and the
epoch. Each process takes its slice of every global batch. The loss is the sum of token losses over the global
batch divided by its number of label tokens (known before the forward pass, since labels come with the data), so
one process with accumulation and many processes with FSDP compute the same gradient.

Output directory:
    config.json, model.safetensors, tokenizer...   the final model, llava-hf layout (or an adapter, for LoRA
                                                    without merging)
    recipe.yaml                                    the recipe as run
    data_report.txt                                records kept and dropped, with reasons
    train_log.jsonl                                one line per logged step
    checkpoints/step-0000100/                      resumable state: model, optimizer, scheduler, data position, RNG
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from ..data.records import DataError, read_records
from ..outputs import output_directory
from ..pipeline import DTYPES, Pipeline
from .build import build_from_parts, build_scratch, load_for_training
from .lora import apply_lora, save_adapter, split_lora_state
from .recipe import Recipe, RecipeError
from .samples import IGNORE_INDEX, Sample, SampleEncoder, validate


# -- processes -------------------------------------------------------------------------------------------------------


@dataclass
class Processes:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls) -> "Processes":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cuda = torch.cuda.is_available()
        if world == 1:
            return cls(0, 1, torch.device("cuda" if cuda else "cpu"))
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        return cls(dist.get_rank(), dist.get_world_size(), device)

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


# -- the model -------------------------------------------------------------------------------------------------------


def make_pipeline(recipe: Recipe) -> Pipeline:
    m = recipe.model
    if m.init == "llava":
        return load_for_training(m.path)
    if m.init == "parts":
        return build_from_parts(m.vision, m.language, m.chat_template, seed=recipe.train.seed)
    return build_scratch(m.tokenizer, m.scratch, m.chat_template, seed=recipe.train.seed)


def part_of(name: str) -> str:
    if name.startswith(("multi_modal_projector.", "image_newline")):
        return "projector"
    if name.startswith("vision_tower."):
        return "vision"
    return "language"


def parameter_groups(model: torch.nn.Module, recipe: Recipe) -> list[dict]:
    """Freeze what does not train; one optimizer group per trained part, at its own learning rate."""
    t = recipe.train
    groups: dict[str, list] = {part: [] for part in t.tune}
    unused = {"vision_tower." + n for n in model.vision_tower.unused_parameter_names(model.cfg.feature_layers)}
    for name, p in model.named_parameters():
        part = part_of(name)
        trains = part in t.tune and name not in unused and (not t.lora.r or part != "language" or ".lora_" in name)
        p.requires_grad_(trains)
        if trains:
            groups[part].append(p)
    return [{"params": ps, "lr": t.lr[part], "name": part} for part, ps in groups.items() if ps]


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP (PyTorch's fully_shard): every vision block and decoder layer its own unit, the rest at the root."""
    from torch.distributed.fsdp import fully_shard

    for block in model.vision_tower.encoder.layers:
        fully_shard(block)
    for layer in model.language_model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def learning_rate_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up, then a cosine from 1 down to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# -- data ------------------------------------------------------------------------------------------------------------


def epoch_batches(lengths: list[int], global_batch: int, seed: int, epoch: int, grouped: bool) -> list[list[int]]:
    """The global batches of one epoch, fixed by (seed, epoch).

    Grouped (LLaVA's modality-length grouping): image and text-only samples never share a batch, and inside
    large shuffled groups samples of similar length are batched together, which saves padding.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if not grouped:
        order = torch.randperm(len(lengths), generator=g).tolist()
        return [order[i : i + global_batch] for i in range(0, len(order) - global_batch + 1, global_batch)]
    batches = []
    for keep in (lambda n: n > 0, lambda n: n < 0):
        indices = [i for i, n in enumerate(lengths) if keep(n)]
        order = [indices[j] for j in torch.randperm(len(indices), generator=g).tolist()]
        group = global_batch * 32
        for start in range(0, len(order), group):
            chunk = sorted(order[start : start + group], key=lambda i: -abs(lengths[i]))
            batches += [chunk[i : i + global_batch] for i in range(0, len(chunk) - global_batch + 1, global_batch)]
    return [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]


class Collator:
    def __init__(self, pipe: Pipeline):
        self.processor = pipe.processor
        self.pad_id = pipe.processor.pad_token_id

    def __call__(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        longest = max(len(s.input_ids) for s in samples)
        ids = torch.full((len(samples), longest), self.pad_id, dtype=torch.long)
        labels = torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(samples), longest), dtype=torch.long)
        for i, s in enumerate(samples):  # right padding: positions are then the same as for the sample alone
            ids[i, : len(s.input_ids)] = torch.tensor(s.input_ids)
            labels[i, : len(s.labels)] = torch.tensor(s.labels)
            mask[i, : len(s.input_ids)] = 1
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        images = [self.processor.load_image(path) for s in samples for path in s.images]
        if images:
            batch.update(self.processor.image_processor(images))
        return batch


def label_tokens(samples: list[Sample]) -> int:
    # labels are shifted by one against the logits: the first position predicts nothing
    return sum(sum(1 for label in s.labels[1:] if label != IGNORE_INDEX) for s in samples)


# -- checkpoints -----------------------------------------------------------------------------------------------------


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def single_process_quiet(procs: Processes):
    """torch.distributed.checkpoint warns on every save and load of one process that it assumes one process, even
    when told so (no_dist=True); that is this run's normal case, not news to print at every checkpoint."""
    with warnings.catch_warnings():
        if procs.world == 1:
            warnings.filterwarnings("ignore", message="torch.distributed is .*uninitialized, assuming the intent")
        yield


def save_checkpoint(directory: Path, model, optimizer, scheduler, position: dict, procs: Processes,
                    keep: int | None) -> None:
    """Write a resumable checkpoint, then delete all but the newest `keep` (None: keep all)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    step_dir = directory / f"step-{position['step']:07d}"
    model_state, optim_state = get_state_dict(model, optimizer)
    with single_process_quiet(procs):
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(step_dir / "state"),
                 no_dist=procs.world == 1)
    torch.save(_rng_state(), step_dir / f"rng-{procs.rank}.pt")
    if procs.main:
        (step_dir / "trainer_state.json").write_text(json.dumps(
            {**position, "scheduler": scheduler.state_dict(), "world_size": procs.world}, indent=2))
    procs.barrier()
    if procs.main and keep is not None:
        steps = sorted(directory.glob("step-*"))
        for old in steps[: max(0, len(steps) - keep)]:
            shutil.rmtree(old)


def find_checkpoint(resume: str, output_dir: Path) -> Path:
    """'latest' (the newest under the run's checkpoints/) or a step directory."""
    if resume == "latest":
        steps = sorted((output_dir / "checkpoints").glob("step-*"))
        steps = [s for s in steps if (s / "trainer_state.json").exists()]
        if not steps:
            raise RecipeError(f"--resume latest: no checkpoint under {output_dir / 'checkpoints'}")
        return steps[-1]
    path = Path(resume)
    if not (path / "trainer_state.json").exists():
        raise RecipeError(f"--resume {resume}: not a checkpoint directory (no trainer_state.json)")
    return path


def load_checkpoint(path: Path, model, optimizer, scheduler, procs: Processes) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    position = json.loads((path / "trainer_state.json").read_text())
    if position["world_size"] != procs.world:
        raise RecipeError(f"{path} was written by {position['world_size']} processes; resume it with as many")
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    with single_process_quiet(procs):
        dcp.load(state, checkpoint_id=str(path / "state"), no_dist=procs.world == 1)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    scheduler.load_state_dict(position.pop("scheduler"))
    _set_rng_state(torch.load(path / f"rng-{procs.rank}.pt", weights_only=True))
    return position


# -- the run ---------------------------------------------------------------------------------------------------------


def autocast_for(precision: str, device: torch.device):
    if precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def load_samples(recipe: Recipe, pipe: Pipeline, procs: Processes, log) -> list[Sample]:
    records = []
    for path in recipe.data.path:
        records += read_records(path, recipe.data.image_folder)
    encoder = SampleEncoder(pipe.processor, pipe.engine.eos_token_ids, recipe.data.format, recipe.data.max_length)
    report = validate(records, encoder, recipe.data.max_bad_fraction)
    log(report.summary())
    if procs.main:
        out = Path(recipe.train.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "data_report.txt").write_text(report.summary() + "\n" + "\n".join(
            f"{reason}: {', '.join(ids)}" for reason, ids in sorted(report.dropped.items())) + "\n")
    return report.samples


def train(recipe: Recipe, resume: str | None = None, progress: bool = True, stop_after: int | None = None) -> Path:
    """Run one training stage. stop_after: end (with a checkpoint) after this many steps, as if interrupted."""
    recipe.validate()
    procs = Processes.start()
    t = recipe.train
    out = Path(t.output_dir)
    if procs.main:
        output_directory(out)
        (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    procs.barrier()
    log = print if procs.main else (lambda *a, **k: None)
    random.seed(t.seed)
    torch.manual_seed(t.seed)

    pipe = make_pipeline(recipe)
    samples = load_samples(recipe, pipe, procs, log)
    model = pipe.model
    if t.lora.r:
        apply_lora(model.language_model, t.lora)
    groups = parameter_groups(model, recipe)
    model.language_model.gradient_checkpointing = t.gradient_checkpointing
    model.vision_tower.gradient_checkpointing = t.gradient_checkpointing
    model.to(procs.device).train()
    if procs.world > 1:
        model = shard(model)
        groups = parameter_groups(model, recipe)  # the sharded parameters replace the originals
    optimizer = torch.optim.AdamW(groups, betas=tuple(t.betas), weight_decay=t.weight_decay,
                                  foreach=procs.device.type == "cuda")

    global_batch = t.batch_size * t.grad_accum * procs.world
    lengths = [s.modality_length for s in samples]
    per_epoch = len(epoch_batches(lengths, global_batch, t.seed, 0, t.group_by_modality_length))
    if per_epoch == 0:
        raise DataError(f"{len(samples)} usable samples do not fill one global batch of {global_batch}")
    total = t.max_steps or max(1, int(t.epochs * per_epoch))
    warmup = int(t.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, total, warmup, t.min_lr_ratio))
    position = {"step": 0, "epoch": 0, "batch": 0, "tokens": 0}
    if resume:
        position = load_checkpoint(find_checkpoint(resume, out), model, optimizer, scheduler, procs)
        # The optimizer's settings and the schedule are this recipe's, not the checkpoint's: a run resumed with more
        # steps or another learning rate takes them from its next step on (the same recipe: the same numbers).
        scheduler.base_lrs = [t.lr[g["name"]] for g in optimizer.param_groups]
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group.update(initial_lr=base, lr=base * factor(scheduler.last_epoch), betas=tuple(t.betas),
                         weight_decay=t.weight_decay)
        log(f"resumed at step {position['step']} of {total}, with this recipe's learning rates and schedule")
    collate = Collator(pipe)
    trainable = [p for g in groups for p in g["params"]]
    log(f"training {sum(p.numel() for p in trainable):,} of {sum(p.numel() for p in model.parameters()):,} "
        f"parameters ({', '.join(g['name'] for g in groups)}) for {total} steps of {global_batch} samples "
        f"on {procs.world} process(es)")

    bar = None
    if progress and procs.main:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=position["step"], desc="training", dynamic_ncols=True)
    log_file = open(out / "train_log.jsonl", "a") if procs.main else None
    start_time, start_tokens = time.perf_counter(), position["tokens"]
    per_rank = t.batch_size * t.grad_accum
    context = autocast_for(t.precision, procs.device)
    batches = epoch_batches(lengths, global_batch, t.seed, position["epoch"], t.group_by_modality_length)
    while position["step"] < total:
        if position["batch"] >= len(batches):
            position["epoch"] += 1
            position["batch"] = 0
            batches = epoch_batches(lengths, global_batch, t.seed, position["epoch"], t.group_by_modality_length)
        global_samples = [samples[i] for i in batches[position["batch"]]]
        denominator = max(1, label_tokens(global_samples))
        mine = global_samples[procs.rank * per_rank : (procs.rank + 1) * per_rank]
        loss_sum, tokens = 0.0, 0
        for micro in range(t.grad_accum):
            chunk = mine[micro * t.batch_size : (micro + 1) * t.batch_size]
            batch = {k: v.to(procs.device) for k, v in collate(chunk).items()}
            labels = batch.pop("labels")
            with context:
                logits = model(**batch)
            token_losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                           ignore_index=IGNORE_INDEX, reduction="sum")
            # FSDP averages gradients over processes: scale so the result is the global token mean
            (token_losses * procs.world / denominator).backward()
            loss_sum += token_losses.item()
            tokens += int(batch["attention_mask"].sum())
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm)
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum, tokens = procs.sum([loss_sum, float(tokens)])
        position["step"] += 1
        position["batch"] += 1
        position["tokens"] += int(tokens)
        elapsed = time.perf_counter() - start_time
        row = {"step": position["step"], "loss": loss_sum / denominator,
               "lr": lrs,
               "grad_norm": float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm),
               "tokens": position["tokens"], "tokens_per_s": (position["tokens"] - start_tokens) / max(elapsed, 1e-9),
               "epoch": position["epoch"], "elapsed_s": round(elapsed, 2)}
        if procs.main and (position["step"] % t.log_every == 0 or position["step"] == total):
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{max(row['lr'].values()):.2e}",
                            tok_s=f"{row['tokens_per_s']:.0f}")
        interrupted = stop_after is not None and position["step"] >= stop_after
        wanted = (t.save_every and position["step"] % t.save_every == 0) or interrupted
        if wanted and t.keep_checkpoints != 0:  # 0 keeps none, so none is written
            save_checkpoint(out / "checkpoints", model, optimizer, scheduler, position, procs, t.keep_checkpoints)
        if interrupted:
            break
    if bar is not None:
        bar.close()
    if log_file is not None:
        log_file.close()
    if position["step"] >= total:
        save_final(model, pipe, recipe, procs)
        log(f"saved to {out}")
    procs.barrier()
    return out


def save_final(model, pipe: Pipeline, recipe: Recipe, procs: Processes) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not procs.main:
        return
    t = recipe.train
    out = Path(t.output_dir)
    dtype = DTYPES[t.save_dtype]
    if t.lora.r:
        merged, adapter = split_lora_state(state, t.lora.scale)
        if not t.lora.merge:
            base = Path(recipe.model.path)
            save_adapter(adapter, t.lora, out, base_model=str(base.resolve()) if base.exists() else str(base))
            return
        state = merged
    pipe.save(out, state_dict=state, dtype=dtype)
