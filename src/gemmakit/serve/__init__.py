"""The OpenAI-compatible server: continuous batching (engine.py), request schemas, the FastAPI app, a load test."""

from .app import create_app, serve
from .engine import Engine
from .events import Event, Job, QueueFull

__all__ = ["Engine", "Event", "Job", "QueueFull", "create_app", "serve"]
