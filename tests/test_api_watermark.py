"""`watermark=` on Model.generate, stream and chat (issue 24): a keys file path, a dict of its fields or a
WatermarkConfig gives exactly the text that `logits_processors=Watermark(...)` gives, and detection finds it."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from gemmakit.errors import GemmaError
from gemmakit.watermark import Watermark, WatermarkConfig

CFG = WatermarkConfig(ngram_len=4, keys=list(range(11, 31)))
PROMPT = "Once upon a time"


def test_watermark_argument_equals_the_processor(fast_model, tmp_path):
    path = tmp_path / "keys.json"
    CFG.save(path)
    kw = dict(temperature=0.8, seed=3, ignore_eos=True)
    ref = fast_model.generate(PROMPT, 12, logits_processors=Watermark(CFG), **kw).token_ids
    plain = fast_model.generate(PROMPT, 12, **kw).token_ids
    assert ref != plain  # the watermark changes what is sampled
    for keys in (CFG, asdict(CFG), path, str(path)):
        assert fast_model.generate(PROMPT, 12, watermark=keys, **kw).token_ids == ref, type(keys)
    text = "".join(fast_model.stream(PROMPT, 12, watermark=path, **kw))
    assert text == fast_model.generate(PROMPT, 12, watermark=CFG, **kw).text
    messages = [{"role": "user", "content": "Tell me a story."}]
    chat_ref = fast_model.chat(messages, 10, logits_processors=Watermark(CFG), **kw)
    assert fast_model.chat(messages, 10, watermark=asdict(CFG), **kw).token_ids == chat_ref.token_ids


def test_watermark_with_other_processors_and_bad_keys(fast_model, tmp_path):
    kw = dict(temperature=0.8, seed=3, ignore_eos=True)
    both = fast_model.generate(PROMPT, 8, watermark=CFG, logits_processors=Watermark(CFG), **kw)
    assert len(both.token_ids) == 8  # the two compose (the same watermark twice, a valid if odd request)
    with pytest.raises(GemmaError, match="keygen"):
        fast_model.generate(PROMPT, 4, watermark=tmp_path / "missing.json")
    with pytest.raises(GemmaError):
        fast_model.generate(PROMPT, 4, watermark={"ngram_len": 4})
