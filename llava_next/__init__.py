"""llava-next: LLaVA 1.5 and LLaVA-NeXT vision-language models in plain PyTorch."""

from .engine import Generation, SamplingParams
from .pipeline import Pipeline, load

__version__ = "0.1.0"
__all__ = ["load", "Pipeline", "Generation", "SamplingParams", "__version__"]
