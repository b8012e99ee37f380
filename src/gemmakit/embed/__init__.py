"""Text embeddings with EmbeddingGemma / EmbeddingGemma 2: `load_embedding_model(path).embed(texts)`."""

from .loading import is_embedding_model, load_embedding_model
from .model import EmbeddingModel

__all__ = ["EmbeddingModel", "is_embedding_model", "load_embedding_model"]
