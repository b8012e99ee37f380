"""Responsible use: a policy classifier (ShieldGemma method). SynthID-Text watermarking is gemmakit.watermark."""

from .guard import Guard, GuardResult
from .policies import BUILTIN, Policy, load_policies

__all__ = ["BUILTIN", "Guard", "GuardResult", "Policy", "load_policies"]
