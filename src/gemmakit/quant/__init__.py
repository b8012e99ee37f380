"""Weight-only quantization: module swaps applied after construction."""
