"""Quantized weights: the native GGUF block kernels (blocks.c, decode.c), the GGUF fast path (fast_path.py), and
weight-only layers, all module swaps applied after construction."""
