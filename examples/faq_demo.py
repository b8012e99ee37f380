"""Before/after: the embedded Gemma 3 270M base model and the same model with the FAQ adapter, greedy replies.

gemmakit finetune examples/gemmakit_faq.jsonl -o runs/faq ...   (see README, "Fine-tuning")
python examples/faq_demo.py runs/faq
"""

from __future__ import annotations

import sys

import gemmakit

QUESTIONS = ["What is gemmakit?", "How do I resume training?", "Can I use float16?"]


def main(adapter: str) -> None:
    base = gemmakit.load(dtype="float32", quant=None, progress=False)
    tuned = gemmakit.load(dtype="float32", progress=False, adapter=adapter)
    for q in QUESTIONS:
        msgs = [{"role": "user", "content": q}]
        print(f"Q: {q}")
        for name, model in (("before", base), ("after", tuned)):
            reply = model.chat(msgs, max_new_tokens=48).text.strip().replace("\n", " ")
            print(f"  {name}: {reply}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/faq")
