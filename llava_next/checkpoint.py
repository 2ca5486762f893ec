"""Finding a checkpoint's files, reading its (sharded) safetensors and mapping weight names onto ours.

Weight names in the wild, all mapped here and nowhere else:
  transformers 4.x on disk   vision_tower.vision_model.*, language_model.model.*, language_model.lm_head.weight
  transformers 5.x on disk   vision_tower.* (no vision_model), the rest as 4.x
  transformers in memory     model.vision_tower.*, model.language_model.*, model.multi_modal_projector.*, lm_head.weight
Ours are the 5.x names with `language_model.` for the decoder and `lm_head.` at the top. (The original LLaVA
repositories' names are mapped in llava_next.original.) Weights are read from safetensors when a checkpoint has
them, else from legacy `pytorch_model*.bin` files through torch.load(weights_only=True), which never runs code.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import LlavaError

# Files a LLaVA checkpoint needs, for downloading only those from the Hub.
CHECKPOINT_FILE_PATTERNS = [
    "*.json",
    "*.jinja",
    "*.safetensors",
    "tokenizer.model",  # the only tokenizer of many original LLaVA checkpoints
]

# Present in some checkpoints, derived from the config by us: never weights.
IGNORED_SUFFIXES = (".position_ids", ".rotary_emb.inv_freq")

# A tensor stored in another dtype than the model's is read and converted this many bytes at a time.
CONVERT_SLICE_BYTES = 16 * 2**20

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo" / "model"


class CheckpointError(LlavaError, RuntimeError):
    """A checkpoint could not be found, downloaded or matched to the model."""


# what the Hub accepts as a repository id (letters, digits, "-", "_", "."), owner and name
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def check_model_name(name_or_path: str | os.PathLike) -> None:
    """Refuses, without reading a weight or the network, a model that is neither "demo", a directory nor a Hub id:
    what a server checks before it starts listening (it loads afterwards, and a mistyped path would only show in its
    503s). A directory's own checks (config.json, an adapter) are the loader's."""
    name = str(name_or_path)
    if not name.strip():
        raise CheckpointError("no model given: name a checkpoint directory, a Hub id or 'demo'")
    path = Path(name).expanduser()
    if name == "demo" or path.is_dir():
        return
    if path.exists():
        raise CheckpointError(f"{path} is a file; point at the checkpoint's directory (the one with config.json)")
    if not HUB_ID.fullmatch(name) or name.startswith((".", "/", "~")):
        raise CheckpointError(f"{name!r} is neither an existing directory nor a Hub id of the form 'owner/name'")


def resolve_checkpoint(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory holding the checkpoint: the path itself, the bundled demo, or a Hub snapshot."""
    if revision is not None and (str(name_or_path) == "demo" or Path(name_or_path).expanduser().exists()):
        raise CheckpointError(f"a revision ({revision!r}) applies to Hub ids; {name_or_path} is a local "
                              f"{'model' if str(name_or_path) == 'demo' else 'path'}: drop --revision (revision=) "
                              "to read it as it is")
    check_model_name(name_or_path)
    if str(name_or_path) == "demo":
        if not (DEMO_MODEL_DIR / "config.json").exists():
            raise CheckpointError(f"the bundled demo model is missing from {DEMO_MODEL_DIR}; run `make demo-model`")
        return DEMO_MODEL_DIR
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            if (path / "train_log.jsonl").exists():  # a training run's output, written when the run finishes
                raise CheckpointError(f"{path} is a training run that has not finished (no config.json yet): finish "
                                      "it (llava-next train ... --resume latest) before using its model")
            raise CheckpointError(f"{path} has no config.json: it is not a checkpoint directory")
        return path
    return _download(str(name_or_path), revision)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    how_to_copy = (
        f"On a machine with network access run `hf download {repo_id} --local-dir DIR` "
        "(or copy the repository's files), then pass that DIR as the model."
    )
    def snapshot(local_files_only: bool) -> Path:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=CHECKPOINT_FILE_PATTERNS,
                                      local_files_only=local_files_only))
        if any(path.glob("*.safetensors")):
            return path
        # legacy weights only (many original LLaVA checkpoints): those, read as plain data (read_pickle_index)
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=local_files_only,
                                      allow_patterns=[*CHECKPOINT_FILE_PATTERNS, "pytorch_model*.bin",
                                                      "pytorch_model.bin.index.json"]))

    try:
        # Use a complete cached copy when there is one, so repeated loads need no network.
        return snapshot(local_files_only=True)
    except Exception:
        pass
    try:
        return snapshot(local_files_only=False)
    except RepositoryNotFoundError:
        raise CheckpointError(f"the Hugging Face Hub has no repository {repo_id!r} (or it is private: log in with "
                              "`hf auth login`)") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise CheckpointError(
            f"could not download {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: {str(e).splitlines()[0]}). "
            + how_to_copy
        ) from None


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file as a dict; a corrupt, truncated or non-object file is an error naming it."""
    try:
        value = json.loads(Path(path).read_bytes())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg}); the file is "
                              "corrupt or incomplete, copy it again") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not valid JSON (not UTF-8 text); the file is corrupt, copy it again") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def _shards_of(index: Path) -> list[Path]:
    """The shard files a `*.index.json` names, every one present."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: has no weight_map naming the shard of each weight; copy it again")
    files = [index.parent / name for name in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"{index.parent}: the shard index names files that are not there: {', '.join(missing)}")
    return files


def weight_files(directory: Path) -> list[Path]:
    """A checkpoint's weight files: safetensors (the shards its index names, the single file, or every
    *.safetensors), else legacy PyTorch shards as many original LLaVA checkpoints are (read as plain data only)."""
    if (directory / "model.safetensors.index.json").exists():
        return _shards_of(directory / "model.safetensors.index.json")
    if (directory / "model.safetensors").exists():
        return [directory / "model.safetensors"]
    others = sorted(directory.glob("*.safetensors"))
    if others:
        return others
    if (directory / "pytorch_model.bin.index.json").exists():
        return _shards_of(directory / "pytorch_model.bin.index.json")
    if (directory / "pytorch_model.bin").exists():
        return [directory / "pytorch_model.bin"]
    shards = sorted(directory.glob("pytorch_model*.bin"))  # (read like *.safetensors shards without their index)
    if shards:
        return shards
    raise CheckpointError(f"{directory} has no model.safetensors (nor sharded *.safetensors with an index, nor "
                          "pytorch_model.bin weights)")


def map_weight_name(name: str) -> str | None:
    """A checkpoint's weight name -> ours, or None for entries that are not weights."""
    if name.endswith(IGNORED_SUFFIXES):
        return None
    if name.startswith("model."):
        name = name[len("model."):]  # transformers' in-memory layout nests everything but lm_head under `model.`
    if name.startswith("vision_tower.vision_model."):
        return "vision_tower." + name[len("vision_tower.vision_model."):]
    if name.startswith("language_model.model."):
        return "language_model." + name[len("language_model.model."):]
    if name.startswith("language_model.lm_head."):
        return "lm_head." + name[len("language_model.lm_head."):]
    return name


def map_part_weight_name(name: str, part: str) -> str | None:
    """A weight name of a standalone checkpoint that becomes one part of a LLaVA model -> ours, or None for entries
    that are not weights: a CLIP vision checkpoint (`vision_model.*`) for part "vision", a causal language model
    (`model.*`, `lm_head.weight`) for part "language"."""
    if name.endswith(IGNORED_SUFFIXES):
        return None
    if part == "vision":
        return "vision_tower." + name.removeprefix("vision_model.")
    if name.startswith("lm_head."):
        return name
    return "language_model." + name.removeprefix("model.")


def checkpoint_weight_name(name: str) -> str:
    """Ours -> transformers 4.x's on-disk name, which transformers 4.x and 5.x both load (the inverse of the map)."""
    if name.startswith("vision_tower."):
        return "vision_tower.vision_model." + name[len("vision_tower."):]
    if name.startswith("language_model."):
        return "language_model.model." + name[len("language_model."):]
    if name.startswith("lm_head."):
        return "language_model." + name
    return name


def new_checkpoint_directory(out: str | os.PathLike, source: Path | None = None) -> Path:
    """`out` as a directory to write a checkpoint into: absent or empty, so that writing it replaces nothing a
    user has (a file, another checkpoint's weights, the checkpoint being read: `source`)."""
    directory = Path(out)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"the output {out} is a file; give a directory to write the checkpoint into")
    if source is not None and directory.exists() and directory.resolve() == Path(source).resolve():
        raise CheckpointError(f"the output {out} is the checkpoint being read; give another directory")
    if directory.is_dir() and any(directory.iterdir()):
        raise CheckpointError(f"the output {out} already holds files; give a new or empty directory (nothing in it "
                              "is replaced)")
    made_in = directory.absolute()  # the directory it will be made in: checked now, made when the writing starts
    while not made_in.exists() and made_in != made_in.parent:
        made_in = made_in.parent
    if not made_in.is_dir():
        raise CheckpointError(f"cannot write {out}: {made_in} is a file, not a directory")
    if not os.access(made_in, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot write {out}: {made_in} is not writable by this user")
    return directory


def save_weights(state_dict: dict[str, torch.Tensor], directory: Path, tied: bool,
                 max_shard_bytes: int = 5 * 2**30) -> None:
    """Write our state dict as safetensors in the llava-hf layout, sharded with an index when it is large."""
    from safetensors.torch import save_file

    tensors = {checkpoint_weight_name(k): v.detach().contiguous().cpu() for k, v in state_dict.items()
               if not (tied and k == "lm_head.weight")}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    for stale in list(directory.glob("model*.safetensors")) + list(directory.glob("model.safetensors.index.json")):
        stale.unlink()
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies in a safetensors file."""

    path: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int

    def read_into(self, target: torch.Tensor) -> None:
        """Fill `target` (same shape; any dtype and device) from the file: straight into its memory when it is a
        contiguous CPU tensor of the stored dtype; else converted a slice at a time through one small buffer (a
        float32 file loaded in bfloat16 never holds a whole float32 tensor), or, when `target` is not contiguous,
        through one temporary of this tensor's size."""
        direct = target.device.type == "cpu" and target.dtype == self.dtype and target.is_contiguous()
        if not self.nbytes:
            return
        if direct:
            self._read_range(target.view(-1), 0, target.numel())
        elif target.is_contiguous():
            flat, count = target.view(-1), target.numel()
            step = max(1, CONVERT_SLICE_BYTES // self.dtype.itemsize)
            buffer = torch.empty(min(step, count), dtype=self.dtype)
            for begin in range(0, count, step):
                part = buffer[: min(step, count - begin)]
                self._read_range(part, begin, part.numel())
                flat[begin : begin + part.numel()].copy_(part)
        else:
            buffer = torch.empty(self.shape, dtype=self.dtype)
            self._read_range(buffer.view(-1), 0, buffer.numel())
            target.copy_(buffer)

    def _read_range(self, out: torch.Tensor, first: int, count: int) -> None:
        """Elements first..first+count of this tensor (flattened) into the contiguous CPU tensor `out`."""
        nbytes = count * self.dtype.itemsize
        if not nbytes:
            return
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset + first * self.dtype.itemsize)
            view = memoryview(out.view(torch.uint8).numpy())[:nbytes]
            got = 0
            while got < nbytes:
                n = f.readinto(view[got:])
                if not n:
                    raise CheckpointError(f"{self.path}: ends inside tensor {self.name}; the file is truncated")
                got += n

    def read(self) -> torch.Tensor:
        tensor = torch.empty(self.shape, dtype=self.dtype)
        self.read_into(tensor)
        return tensor


def read_safetensors_index(path: Path) -> list[StoredTensor]:
    """The tensors of a safetensors file, from its header alone; a corrupt or truncated header is an error."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: {size} bytes is too short to be a safetensors file")
        length = int.from_bytes(head, "little")
        if length > min(size - 8, 100 * 2**20):
            raise CheckpointError(f"{path}: not a safetensors file (its header length {length} does not fit the file)")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not a safetensors file (corrupt header: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (the header is not a JSON object)")
    tensors = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed or unsupported header entry {entry!r}") from None
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes or begin < 0 or 8 + length + end > size:
            raise CheckpointError(f"{path}: tensor {name!r} lies outside the file or has the wrong size; the file is "
                                  "truncated or corrupt")
        tensors.append(StoredTensor(path, name, dtype, shape, 8 + length + begin, nbytes))
    return tensors


@dataclass(frozen=True)
class PickledTensor:
    """One tensor of a legacy PyTorch weight file (`pytorch_model*.bin`), memory-mapped: read from disk when
    copied into its parameter, so a shard never exists twice in memory."""

    path: Path
    name: str
    tensor: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def read_into(self, target: torch.Tensor) -> None:
        target.copy_(self.tensor)

    def read(self) -> torch.Tensor:
        return self.tensor.clone()


def read_pickle_index(path: Path) -> list[PickledTensor]:
    """The tensors of a `pytorch_model*.bin` file, read with torch.load(weights_only=True): the unpickler builds
    tensors and plain containers only, so a file that tries to run code (a pickled function call) is refused here
    rather than executed. It does not vouch for the numbers: those are checked like any checkpoint's."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "_use_new_zipfile_serialization" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # the pre-1.6 format: read, not mapped
    except Exception as e:  # the unpickler's refusal, a zip error, a truncated file: all mean "not plain weights"
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # (torch's refusal is in bold on a terminal)
        first = text.splitlines()[0] if text else type(e).__name__
        if len(first) > 300:
            first = first[:300].rsplit(" ", 1)[0] + " ..."
        if isinstance(e, pickle.UnpicklingError):  # torch's restricted unpickler met something other than data
            raise CheckpointError(f"{path}: not a PyTorch weight file that can be read as plain data ({first}). A "
                                  "file that needs code to load is never run; get the checkpoint's safetensors or "
                                  "re-save it") from None
        raise CheckpointError(f"{path}: cannot be read as a PyTorch weight file ({first}); it may be truncated or "
                              "damaged: download or copy it again") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{path}: expected a dictionary of named tensors (a state dict)")
    return [PickledTensor(path, name, tensor) for name, tensor in state.items()]


def stored_tensors(files: list[Path]) -> list[StoredTensor | PickledTensor]:
    """Every tensor of a checkpoint's weight files, safetensors or legacy .bin."""
    return [t for path in files
            for t in (read_pickle_index(path) if path.suffix == ".bin" else read_safetensors_index(path))]


def iter_checkpoint_tensors(files: list[Path]):
    """(checkpoint name, function reading the tensor) for every tensor of every file."""
    for stored in stored_tensors(files):
        yield stored.name, stored.read


def load_weights(model: torch.nn.Module, files: list[Path], progress: bool = False, rename=map_weight_name,
                 more: tuple[tuple[list[Path], object], ...] = (), on_loaded=None) -> None:
    """Fill `model` (which may hold uninitialised memory) from the checkpoint's files, strictly and leanly.

    Every weight must be found and every tensor in the files must have a place (but for what the model leaves out
    on purpose); otherwise this fails naming the keys, because a model that runs with some weights left random
    gives plausible-looking wrong answers. Each tensor is read from the file straight into its parameter (or a
    view of a fused one), so loading needs no memory beyond the model's and one tensor's. `on_loaded(name)` is
    called after each weight is filled; no reference to it is kept past that (a caller may replace and free it).
    """
    params = model.checkpoint_weights()
    expected = set(params)
    skipped = model.skipped_checkpoint_prefixes()
    # (our name or None, stored tensor): `rename` maps the checkpoint's names; `more` adds (files, rename) pairs
    # of other checkpoints that supply parts of the model (the separate CLIP tower of an original LLaVA checkpoint)
    named = [(rename(t.name), t) for t in stored_tensors(files)]
    for extra_files, extra_rename in more:
        named += [(extra_rename(t.name), t) for t in stored_tensors(extra_files)]
    stored = [t for _, t in named]
    bar = None
    if progress and sum(t.nbytes for t in stored) > 200 * 2**20:
        from tqdm import tqdm

        bar = tqdm(total=sum(t.nbytes for t in stored), unit="B", unit_scale=True, desc="loading weights", leave=False)
    loaded: set[str] = set()
    unexpected: list[str] = []
    shape_errors: list[str] = []
    not_finite: list[str] = []
    duplicates: list[str] = []
    tied_aliases = _tied_aliases(model)
    for name, tensor in named:
        if name is None or name in tied_aliases or name.startswith(skipped):
            continue  # not a weight, a tied weight stored twice (its first name is loaded), or left out on purpose
        if name in loaded:
            duplicates.append(tensor.name)
            continue
        if name not in params:
            unexpected.append(tensor.name)
            continue
        target = params[name]
        if tensor.shape != tuple(target.shape):
            shape_errors.append(f"{tensor.name}: checkpoint {tensor.shape} vs model {tuple(target.shape)}")
            continue
        with torch.no_grad():
            tensor.read_into(target)
            if target.is_floating_point() and not _finite(target):
                not_finite.append(tensor.name)
        del params[name], target
        if bar is not None:
            bar.update(tensor.nbytes)
        loaded.add(name)
        if on_loaded is not None:
            on_loaded(name)
    if bar is not None:
        bar.close()
    missing = sorted(expected - loaded)
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {_preview(missing)}")
    if unexpected:
        problems.append(f"in the checkpoint but not in the model: {_preview(unexpected)}")
    if shape_errors:
        problems.append(f"shapes differ: {_preview(shape_errors)}")
    if duplicates:
        problems.append(f"stored more than once: {_preview(duplicates)}")
    if problems:
        raise CheckpointError(
            "the checkpoint's weights do not match its config (" + "; ".join(problems) + "). "
            "The config.json and the weights may come from different models."
        )
    if not_finite:
        raise CheckpointError(f"the checkpoint has NaN or infinite values in {_preview(not_finite)}; the weights are "
                              "corrupt (or overflowed when they were saved in a narrower dtype)")


def _finite(tensor: torch.Tensor) -> bool:
    """No NaN or infinity in `tensor`: its minimum and maximum are finite (aminmax propagates a NaN). One pass with no
    full-size temporary, as a sum would be, but exact and faster in 16 bits: 0.7 against 3.3-3.7 ms for a 12 MB
    bfloat16 matrix, where the sum was a third of a medium model's load (measured on an Intel Xeon)."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return math.isfinite(float(low)) and math.isfinite(float(high))


def _tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """Names of parameters that are another, earlier parameter (a tied lm_head) -> that parameter's name."""
    seen: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            aliases[name] = seen[id(p)]
        else:
            seen[id(p)] = name
    return aliases


def _preview(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
