"""gemmakit: run, chat with, serve and fine-tune Google's Gemma models locally, CPU first."""

from .api import Model
from .config import PRESETS, GemmaConfig
from .errors import GemmaError
from .generate import GenerationResult
from .loader import load

__all__ = ["GemmaConfig", "GemmaError", "GenerationResult", "Model", "PRESETS", "load"]
__version__ = "0.1.0"
