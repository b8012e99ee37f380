"""Responsible use: a policy classifier (ShieldGemma method) and SynthID-Text watermarking with a detector."""

from .guard import Guard, GuardResult
from .policies import BUILTIN, Policy, load_policies

__all__ = ["BUILTIN", "Guard", "GuardResult", "Policy", "load_policies"]
