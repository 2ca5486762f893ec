"""Runs a standard benchmark (`eval/tasks/`) on a pipeline: reads the task's split of its published dataset, asks
every question through the generation engine (batched, greedy, the task's max_new_tokens, the checkpoint's chat
template with the images first), scores each answer as lmms-eval does and aggregates.

Every answered question is appended to `predictions.jsonl` as soon as its batch is done, so an interrupted run
resumes where it stopped: the questions already in the file are not asked again and their scores are read back.
Under torchrun (RANK / WORLD_SIZE set) each process takes every WORLD_SIZE-th question and writes its own
predictions file; the last process to finish merges them in dataset order and writes the results, which equal a
single process's.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import LlavaWarning
from ..outputs import output_directory
from ..prompt import user_turn
from .tasks import Sample, Skip, Task, TaskDataError, get_task


# -- data ------------------------------------------------------------------------------------------------------------


def read_rows(data: str | Path, task: Task) -> tuple[Iterator[dict[str, Any]], int | None]:
    """The rows of the task's split, and how many there are when the files say so.

    `data`: a parquet file; a directory of parquet files as the Hub dataset stores them (`<split>-*.parquet`,
    under `data/` or the configuration's folder); a directory written by `datasets`' save_to_disk; or, when no
    such path exists, a Hub dataset id (read with `datasets`, which needs the network).
    """
    path = Path(data)
    if path.is_file():
        return _parquet_rows([path])
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists() or \
                (path / task.split / "state.json").exists():
            return _saved_dataset_rows(path, task)
        rows, total = _parquet_rows(_split_files(path, task, task.hub_config))
        if task.companion is not None:  # e.g. GQA's images, a configuration of their own beside the questions
            config, join = task.companion
            companion, _ = _parquet_rows(_split_files(path, task, config, required=True))
            rows = iter(join(rows, companion))
        return rows, total
    if str(data).count("/") == 1 and not str(data).startswith((".", "/")):
        return _hub_rows(str(data), task)
    raise TaskDataError(f"{data}: no such file or directory (nor a Hub dataset id)")


def _split_files(path: Path, task: Task, config: str | None, required: bool = False) -> list[Path]:
    """The parquet files of the task's split under `path`; where the directory holds several configurations (a
    folder each, as the Hub stores them), those of `config`."""
    files = sorted(path.rglob("*.parquet"))
    in_config = [f for f in files if config and config in f.relative_to(path).parts[:-1]]
    if in_config or required:
        files = in_config
    if not files:
        raise TaskDataError(f"{path}: no parquet files" + (f" of the configuration {config!r} (a folder of that "
                            "name)" if required else " and no `datasets` save_to_disk layout") +
                            f"; give the {task.hub_dataset} dataset's files for the {task.split!r} split")
    chosen = [f for f in files if _split_of(f, path) == task.split]
    if not chosen:
        found = sorted({_split_of(f, path) for f in files})
        raise TaskDataError(f"{path}: no parquet files of the {task.split!r} split (found: {', '.join(found)}); "
                            f"{task.name} evaluates {task.hub_dataset}'s {task.split!r} split")
    return chosen


def _split_of(file: Path, root: Path) -> str:
    """A Hub parquet file's split: its name's prefix before '-' (validation-00000-of-00002.parquet), or its folder's
    name when the file is named by number only."""
    stem = file.name.split("-")[0].removesuffix(".parquet")
    return stem if not stem.isdigit() else file.parent.name


def _parquet_rows(files: list[Path]) -> tuple[Iterator[dict[str, Any]], int | None]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise TaskDataError("reading parquet needs pyarrow: pip install pyarrow (or, in the checkout, "
                            "pip install -e '.[eval]')") from None
    total = 0
    for f in files:
        try:
            total += pq.ParquetFile(f).metadata.num_rows
        except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds on a file that is not parquet
            raise TaskDataError(f"{f}: not a readable parquet file ({e})") from None

    def rows() -> Iterator[dict[str, Any]]:
        for f in files:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=64):
                yield from batch.to_pylist()

    return rows(), total


def _saved_dataset_rows(path: Path, task: Task) -> tuple[Iterator[dict[str, Any]], int | None]:
    try:
        import datasets
    except ImportError:
        raise TaskDataError("reading a `datasets` directory needs the datasets library: pip install datasets") from None
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if task.split not in loaded:
            raise TaskDataError(f"{path}: no {task.split!r} split (found: {', '.join(loaded)})")
        loaded = loaded[task.split]
    return iter(loaded), len(loaded)


def _hub_rows(dataset_id: str, task: Task) -> tuple[Iterator[dict[str, Any]], int | None]:
    try:
        import datasets
    except ImportError:
        raise TaskDataError("reading a Hub dataset needs the datasets library: pip install datasets") from None
    print(f"{dataset_id}: no such file or directory here; reading it as a Hub dataset id", file=sys.stderr)
    try:
        loaded = datasets.load_dataset(dataset_id, task.hub_config, split=task.split)
    except Exception as e:  # noqa: BLE001 - datasets' and the Hub client's many errors: the same advice for each
        first_line = (str(e).splitlines() or [""])[0][:300]
        raise TaskDataError(
            f"{dataset_id}: no such file or directory here, and reading it from the Hugging Face Hub failed "
            f"({type(e).__name__}: {first_line}). Check the path; or, on a machine with network access, run `hf "
            f"download {dataset_id} --repo-type dataset --local-dir DIR` and pass that DIR") from None
    return iter(loaded), len(loaded)


# -- running ---------------------------------------------------------------------------------------------------------


@dataclass
class TaskResult:
    task: str
    metrics: dict[str, float]
    samples: int  # questions in the data (after --limit)
    answered: int
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"index", "id", "reason"}
    resumed: int = 0  # answers read back from an earlier run's predictions
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        lines = [f"| {self.task} | value |", "| --- | ---: |"]
        lines += [f"| {name} | {value:.4f} |" if isinstance(value, float) else f"| {name} | {value} |"
                  for name, value in self.metrics.items()]
        lines.append(f"\n{self.answered} answered, {len(self.skipped)} skipped, {self.samples} in the data"
                     + (f" ({self.resumed} from the earlier run's predictions)" if self.resumed else "")
                     + f"; {self.seconds:.1f} s")
        for s in self.skipped[:20]:
            lines.append(f"- skipped #{s['index']} ({s['id']}): {s['reason']}")
        if len(self.skipped) > 20:
            lines.append(f"- ... and {len(self.skipped) - 20} more (results.json lists them all)")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "metrics": self.metrics, "samples": self.samples, "answered": self.answered,
                "skipped": len(self.skipped), "skipped_samples": self.skipped, "resumed": self.resumed,
                "seconds": round(self.seconds, 3), "settings": self.settings}


def messages_of(sample: Sample) -> list[dict[str, Any]]:
    """As lmms-eval's LLaVA models prompt: the images first, then the text, or, where the text has `<image>` typed
    in it, the images there (prompt.user_turn, as the CLI's)."""
    return [user_turn(sample.prompt, len(sample.images))]


def read_predictions(path: Path) -> dict[int, dict[str, Any]]:
    """An earlier run's predictions by dataset index. A line cut short by an interruption is dropped (it will be
    asked again); any other damage is an error, since silently redoing or dropping answers would lose them."""
    done: dict[int, dict[str, Any]] = {}
    if not path.exists():
        return done
    lines = path.read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) or (number == len(lines) - 1 and not lines[-1]):
                continue  # the last line, cut short
            raise TaskDataError(f"{path}:{number}: not JSON; the predictions file is damaged (move it away to "
                                "start over)") from None
        done[int(record["index"])] = record
    return done


# lmms-eval's command line removes these blocks from every answer before scoring (its --reasoning_tags default)
REASONING_TAGS = (("<think>", "</think>"), ("<analysis>", "</analysis>"))


def without_reasoning(text: str) -> str:
    """The answer with <think>...</think> and <analysis>...</analysis> blocks removed, and, where only a closing tag
    is left (a template that opened the block itself), what follows the last one; stripped, as lmms-eval does.
    (lmms-eval removes them after a task's answer filter, we before its scoring; they differ only on answers that
    contain such blocks.)"""
    for start_tag, end_tag in REASONING_TAGS:
        while True:
            start = text.find(start_tag)
            end = text.find(end_tag, start) if start >= 0 else -1
            if start < 0 or end < 0:
                break
            text = text[:start] + text[end + len(end_tag):]
        if end_tag in text and start_tag not in text:
            text = text.rsplit(end_tag, 1)[-1]
    return text.strip()


def drop_partial_line(path: Path) -> None:
    """Cuts a last line an interruption left without its newline, so that appended answers start on a line of
    their own."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def answering_model(pipe, model_name: str) -> dict[str, Any]:
    """What answers: the model as named (a local one by its absolute path, else its directory), its dtype and
    quantization. An earlier run's predictions are resumed only by the same."""
    quantization = pipe.quantization or {}
    mode = quantization.get("mode")
    local = model_name not in ("", "demo") and Path(model_name).expanduser().exists()
    name = str(Path(model_name).expanduser().resolve()) if local else model_name or str(pipe.directory)
    return {"model": name, "dtype": str(pipe.model.dtype).removeprefix("torch."),
            "quantize": mode, "group_size": quantization.get("group_size") if mode == "int4" else None}


def describe_model(model: dict[str, Any]) -> str:
    how = [model.get("quantize"), model.get("group_size") and f"groups of {model['group_size']}", model.get("dtype")]
    return f"{model.get('model')} ({', '.join(str(h) for h in how if h)})"


def check_same_model(out: Path, rank: int, model: dict[str, Any]) -> None:
    """Records in `out/model.json` what answers; refuses to resume predictions that another model (or the same one
    in another dtype or quantization) gave, whose answers would be scored as this one's. Every process of a
    torchrun checks against every process's predictions, so the order they start in does not matter."""
    record = out / "model.json"
    answered = any(p.stat().st_size > 0 for p in out.glob("predictions*.jsonl"))
    if answered and record.exists():
        earlier = json.loads(record.read_text(encoding="utf-8"))
        if earlier != model:
            raise TaskDataError(f"{out}: its predictions were answered by {describe_model(earlier)}, this run is "
                                f"{describe_model(model)}; use another --output (or move the predictions away to "
                                "start over)")
        return
    if answered:  # a run of a version that did not record its model
        warnings.warn(f"{out}: its predictions do not say which model gave them (written before model.json was); "
                      f"they are resumed as {describe_model(model)}'s", LlavaWarning, stacklevel=3)
    temporary = out / f".model.json.{rank}"  # (every process of a torchrun writes it; each replaces it whole)
    temporary.write_text(json.dumps(model, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, record)


def shard() -> tuple[int, int]:
    """(rank, world size) under torchrun or any launcher that sets RANK and WORLD_SIZE; (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def run_task(pipe, task_name: str, data: str | Path, output: str | Path | None = None, limit: int | None = None,
             batch_size: int = 16, progress: bool = False, model_name: str = "") -> TaskResult:
    task = get_task(task_name)
    rank, world = shard()
    began = time.perf_counter()
    out = output_directory(output) if output is not None else None
    predictions = out / (f"predictions.rank{rank}.jsonl" if world > 1 else "predictions.jsonl") if out else None
    done = read_predictions(predictions) if predictions else {}
    if predictions is not None and predictions.exists():
        drop_partial_line(predictions)
    if world > 1 and out is not None:
        (out / f"shard{rank}.done.json").unlink(missing_ok=True)  # from an earlier run: this one is not done yet
    resumed = len(done)
    model = answering_model(pipe, model_name)
    if out is not None:
        check_same_model(out, rank, model)
    rows, total = read_rows(data, task)
    if total is not None and limit is not None:
        total = min(total, limit)
    if total == 0:
        raise TaskDataError(f"{data}: the {task.split!r} split has no rows")
    settings = {"max_new_tokens": task.max_new_tokens, "temperature": 0, "batch_size": batch_size, "limit": limit,
                "data": str(data), "split": task.split, **model, "world_size": world}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=task.name, unit="q", leave=False)  # its rate and remaining time are the ETA
    skipped: list[dict[str, str]] = []
    pending: list[tuple[int, Sample]] = []
    seen = 0
    with open(predictions, "a", encoding="utf-8") if predictions else _NoFile() as sink:
        def flush() -> None:
            answers = pipe.generate([messages_of(s) for _, s in pending], [s.images for _, s in pending],
                                    max_new_tokens=task.max_new_tokens, temperature=0)
            for (index, sample), answer in zip(pending, answers):
                record = {"index": index, "id": sample.id, "prompt": sample.prompt, "prediction": answer.text,
                          "references": sample.references,
                          "score": task.score(sample, without_reasoning(answer.text))}
                done[index] = record
                sink.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
            sink.flush()
            if bar is not None:
                bar.update(len(pending))
            pending.clear()

        for index, item in enumerate(task.samples(rows)):
            if limit is not None and index >= limit:
                break
            seen += 1
            if index % world != rank:
                continue
            if isinstance(item, Skip):
                skipped.append({"index": index, "id": item.id, "reason": item.reason})
                if bar is not None:
                    bar.update(1)
                continue
            if index in done:
                if str(done[index]["id"]) != str(item.id):
                    raise TaskDataError(f"{predictions}: question #{index} is {done[index]['id']!r} there but "
                                        f"{item.id!r} in {data}; these predictions are from other data (use "
                                        "another --output)")
                if bar is not None:
                    bar.update(1)
                continue
            pending.append((index, item))
            if len(pending) >= batch_size:
                flush()
        if pending:
            flush()
    if bar is not None:
        bar.close()
    mine = {i: r for i, r in done.items() if (limit is None or i < limit) and i % world == rank}
    if world > 1:
        return _merge_shards(task, out, rank, world, mine, skipped, seen, resumed, began, settings)
    scores = [mine[i]["score"] for i in sorted(mine)]
    result = TaskResult(task.name, task.aggregate(scores) if scores else {}, seen, len(scores), skipped, resumed,
                        time.perf_counter() - began, settings)
    if out is not None:
        (out / "results.json").write_text(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
    return result


def _merge_shards(task: Task, out: Path | None, rank: int, world: int, mine: dict, skipped: list, seen: int,
                  resumed: int, began: float, settings: dict) -> TaskResult:
    """Each process records that it finished; the last to finish reads every shard and writes the merged results."""
    if out is None:
        raise TaskDataError("several processes need --output: they merge their predictions through it")
    (out / f"shard{rank}.done.json").write_text(json.dumps({"skipped": skipped, "seen": seen, "resumed": resumed}))
    if not all((out / f"shard{r}.done.json").exists() for r in range(world)):  # another will merge when it is done
        return TaskResult(task.name, {}, seen, len(mine), skipped, resumed, time.perf_counter() - began, settings)
    records: dict[int, dict[str, Any]] = {}
    all_skipped: list[dict[str, str]] = []
    total_resumed = 0
    for r in range(world):
        records.update(read_predictions(out / f"predictions.rank{r}.jsonl"))
        info = json.loads((out / f"shard{r}.done.json").read_text())
        all_skipped += info["skipped"]
        total_resumed += info["resumed"]
    limit = settings["limit"]
    ordered = [records[i] for i in sorted(records) if limit is None or i < limit]
    (out / "predictions.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n"
                                                   for r in ordered), encoding="utf-8")
    all_skipped.sort(key=lambda s: s["index"])
    scores = [r["score"] for r in ordered]
    result = TaskResult(task.name, task.aggregate(scores) if scores else {}, seen, len(scores), all_skipped,
                        total_resumed, time.perf_counter() - began, settings)
    (out / "results.json").write_text(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
    return result


class _NoFile:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass
