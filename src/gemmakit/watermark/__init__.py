"""gemmakit.watermark: SynthID-Text in one namespace (the code lives in synthid.py and detector.py).

    keys = gemmakit.watermark.WatermarkConfig.generate()          # or WatermarkConfig.load("keys.json")
    text = model.generate(prompt, 64, temperature=0.8, logits_processors=gemmakit.watermark.Watermark(keys)).text
    gemmakit.watermark.detect(text, keys).watermarked              # True: p-value <= 0.01
"""

from .detector import DEFAULT_FPR, Detection, detect
from .synthid import Watermark, WatermarkConfig

__all__ = ["DEFAULT_FPR", "Detection", "Watermark", "WatermarkConfig", "detect"]
