"""Fine-tuning: JSONL data with loss masks, LoRA/QLoRA training on one process or many (torchrun), checkpoints.

Its benchmark lives in bench/finetune.py."""
