"""gemmakit: run, chat with, serve and fine-tune Google's Gemma models locally, CPU first."""

from . import chat_templates as chat  # gemmakit.chat.render(...): the name before chat_templates/
from . import watermark  # gemmakit.watermark.detect / Watermark / WatermarkConfig
from .api import Model
from .config import PRESETS, GemmaConfig
from .embed import EmbeddingModel, load_embedding_model
from .errors import GemmaError
from .generate import GenerationResult
from .loader import load
from .safety import Guard, GuardResult, Policy
from .safety.guard import guard

__all__ = ["EmbeddingModel", "GemmaConfig", "GemmaError", "GenerationResult", "Guard", "GuardResult", "Model",
           "PRESETS", "Policy", "chat", "guard", "load", "load_embedding_model", "watermark"]
__version__ = "0.1.0"
