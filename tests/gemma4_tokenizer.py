"""A Gemma 4 tokenizer for tests, built offline from the embedded Gemma 3 vocabulary, and the official template.

Gemma 4's SentencePiece vocabulary is Gemma 3's 262144 pieces with Gemma 4's markers in slots that Gemma 3 leaves
unused (<unusedN>) or uses for its own turn/image markers. Evidence that the ordinary pieces are the same ids:
transformers' DiffusionGemma chat test (tests/models/diffusion_gemma/test_modeling_diffusion_gemma.py) tokenizes
"<bos><|turn>user\\nWrite a long essay about Portugal.<turn|>\\n<|turn>model\\n<|channel>thought\\n<channel|>" with
the Gemma 4 tokenizer to [2, 105, 2364, 107, 6974, 496, 1440, 20494, 1003, 23613, 236761, 106, 107, 105, 4368,
107, 100, 45518, 107, 101]; every non-marker id there is the Gemma 3 tokenizer's id for the same text (checked in
test_chat_templates_gemma4.py). The marker ids:
- <|turn> 105, <turn|> 106, <|tool_response> 50, <|image> 255999, <|audio> 256000, <|image|> 258880,
  <|audio|> 258881, <image|> 258882, <audio|> 258883: google-deepmind/gemma, gemma/gm/text/_tokenizer.py
  (_Gemma4SpecialTokens);
- <|channel> 100, <channel|> 101: the DiffusionGemma ids above;
- <|tool> 46, <tool|> 47, <|tool_call> 48, <tool_call|> 49, <tool_response|> 51, <|"|> 52, <|think|> 98: the
  Gemma 4 vocabulary tables of several independent Gemma 4 tool/reasoning parsers' tests (vLLM's Gemma 4 reasoning
  parser docstring names <|think|> as token 98), all agreeing.
What this tokenizer cannot prove is that no other ordinary piece changed between Gemma 3 and 4; the tests use the
same tokenizer on both sides (gemmakit and transformers), so they check the template and the marker handling.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

from reference import hf_gguf_tokenizer_dir

TEMPLATE = (Path(__file__).parent / "data" / "gemma4_chat_template.jinja").read_text(encoding="utf-8")
TEMPLATE_MD5 = "8c34cf93c7a7815b3fdb300a009c4c17"  # Google's E2B/E4B chat_template.jinja, 17466 bytes

SPECIAL = {
    46: "<|tool>", 47: "<tool|>", 48: "<|tool_call>", 49: "<tool_call|>", 50: "<|tool_response>",
    51: "<tool_response|>", 52: '<|"|>', 98: "<|think|>", 100: "<|channel>", 101: "<channel|>",
    105: "<|turn>", 106: "<turn|>", 255999: "<|image>", 256000: "<|audio>", 258880: "<|image|>",
    258881: "<|audio|>", 258882: "<image|>", 258883: "<audio|>",
}  # fmt: skip


def gemma4_tokenizer_dir() -> Path:
    """An HF tokenizer folder (tokenizer.json + config) with Gemma 4's markers at their ids, cached beside the
    Gemma 3 one it is made from."""
    src = hf_gguf_tokenizer_dir()
    root = src.parent
    folder = root / f"{src.name}-gemma4-v1"
    if (folder / "tokenizer.json").exists():
        return folder
    data = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    old = {i: p for p, i in vocab.items() if i in SPECIAL}
    for i, piece in SPECIAL.items():
        del vocab[old[i]]
        vocab[piece] = i
    added = {t["id"]: t for t in data["added_tokens"]}
    for i, piece in SPECIAL.items():
        added[i] = {"id": i, "content": piece, "single_word": False, "lstrip": False, "rstrip": False,
                    "normalized": False, "special": True}
    data["added_tokens"] = [added[i] for i in sorted(added)]
    tmp = root / f"{folder.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    shutil.copy(src / "tokenizer_config.json", tmp / "tokenizer_config.json")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


@functools.cache
def gemma4_tokenizer():
    """gemmakit's Tokenizer for the Gemma 4 test vocabulary (built once per session, ~4 s)."""
    from gemmakit.tokenizer import Tokenizer

    return Tokenizer.from_hf_json(gemma4_tokenizer_dir() / "tokenizer.json")


@functools.cache
def gemma4_hf_tokenizer():
    """transformers' tokenizer for the same vocabulary: the reference side."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(gemma4_tokenizer_dir()))
