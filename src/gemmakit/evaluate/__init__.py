"""Evaluation: sliding-window perplexity, parity checks (verify), and the lm-evaluation-harness model type."""

from .perplexity import Perplexity, perplexity, perplexity_of_file
from .scoring import Scores, score, score_batch

__all__ = ["Perplexity", "Scores", "perplexity", "perplexity_of_file", "score", "score_batch"]
