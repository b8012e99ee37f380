"""Benchmarks: gemmakit side by side with its peers, each side in its own process, results as JSON + markdown.

inference.py: decode/prefill/load/RSS against llama-cpp-python and transformers; finetune.py: LoRA steps against
transformers + PEFT; server.py: aggregate tok/s of concurrent clients of `gemmakit serve`. Speed lives here, never in
timed unit tests.
"""
