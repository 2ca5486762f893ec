"""llava-next: LLaVA 1.5 and LLaVA-NeXT vision-language models in plain PyTorch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["load", "Pipeline", "Generation", "SamplingParams", "__version__"]

# The module each public name comes from, imported on first use: `import llava_next` and the command line's --help
# and argument checks do not import torch (~2 s) before a model is loaded.
_PUBLIC = {"load": "pipeline", "Pipeline": "pipeline", "Generation": "engine", "SamplingParams": "sampling_params"}

if TYPE_CHECKING:
    from .engine import Generation
    from .pipeline import Pipeline, load
    from .sampling_params import SamplingParams


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
