"""Assistant drafters as GGUF (draft_gguf.py): `gemmakit convert` of an assistant folder writes llama.cpp's
gemma4-assistant layout, and gemmakit loads it back as the same drafter: the same drafts, round by round."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import gemmakit
from gemmakit.cli.convert import convert
from gemmakit.draft import Drafter
from gemmakit.draft_gguf import ARCH
from gemmakit.errors import GemmaError
from gemmakit.generate import generate_step
from gemmakit.model import Gemma
from gemmakit.sampling import SamplingParams
from gemmakit.speculative import Round, speculative_step
from gemmakit.weights.gguf import read_gguf
from helpers import TINY4
from test_draft import PROMPT, assistant_config, hf_assistant


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(target module, HF assistant folder, its f32 GGUF, its q8_0 GGUF), the GGUFs written by `gemmakit convert`."""
    cfg = TINY4["gemma4-e-keqv"]
    torch.manual_seed(0)
    target = Gemma(cfg).eval()
    root = tmp_path_factory.mktemp("draft_gguf")
    hf_assistant(assistant_config(cfg)).save_pretrained(root / "assistant")
    for qtype in ("f32", "q8_0"):
        convert(out=root / f"assistant.{qtype}.gguf", model=str(root / "assistant"), to="gguf", qtype=qtype,
                adapter=None, variant=None, force=False, dtype="float32")
    return target, root / "assistant", root / "assistant.f32.gguf", root / "assistant.q8_0.gguf"


def _rounds(target: Gemma, drafter: Drafter, k: int = 3) -> tuple[list[int], list[list[int]]]:
    rounds: list[list[Round]] = [[]]
    tokens = [int(t) for t in speculative_step(target, drafter, [PROMPT], SamplingParams(), 12, k, rounds=rounds,
                                                adaptive=False)]
    return tokens, [r.drafted for r in rounds[0]]


def test_gguf_drafter_drafts_as_the_folder(folders):
    target, folder, f32, _ = folders
    g = read_gguf(f32)
    assert g.architecture == ARCH
    assert {"mtp.pre_projection.weight", "mtp.post_projection.weight", "mtp.centroids.weight",
            "mtp.token_ordering.weight", "token_embd.weight", "blk.0.attn_q.weight", "rope_freqs.weight"} <= set(
        g.tensors)
    assert not any(".attn_k." in n or ".attn_v." in n for n in g.tensors)  # the drafter reads the target's keys
    assert g.arch_get("embedding_length_out") == target.config.hidden_size
    hf = gemmakit.load(folder, dtype="float32", quant=None, progress=False)
    ours = gemmakit.load(f32, dtype="float32", quant=None, progress=False)
    assert isinstance(ours, Drafter)
    assert ours.config.text.replace(name="") == hf.config.text.replace(name="")
    assert dataclasses.replace(ours.config, text=hf.config.text) == hf.config
    for name, t in hf.state_dict().items():
        assert torch.equal(ours.state_dict()[name], t), name
    assert _rounds(target, ours) == _rounds(target, hf)


def test_drafters_on_blocks_keep_greedy_exact(folders):
    """On the fast path a drafter's projections run on blocks (a GGUF's own Q8_0, or the folder's weights as Q8_0
    with quant="q8"): its numbers change a little, the target's output never does."""
    from gemmakit.quant.qlinear import QLinear

    target, folder, _, q8 = folders
    prompts = [PROMPT, PROMPT[:5]]
    plain = torch.stack(list(generate_step(target, prompts, SamplingParams(), 10)), 1).tolist()
    for source, quant in ((q8, None), (q8, "auto"), (folder, "q8")):
        drafter = gemmakit.load(source, dtype="float32", quant=quant, progress=False)
        blocks = [m for m in drafter.modules() if isinstance(m, QLinear)]
        assert len(blocks) == (0 if quant is None else 2 + 5 * len(drafter.model.layers))
        assert not isinstance(drafter.masked_embedding.centroids, QLinear)  # the router stays float
        spec = torch.stack(list(speculative_step(target, drafter, prompts, SamplingParams(), 10, 3)), 1).tolist()
        assert spec == plain


def test_a_drafter_converts_to_gguf_only(folders, tmp_path):
    _, folder, _, _ = folders
    with pytest.raises(GemmaError, match="gguf only"):
        convert(out=tmp_path / "out", model=str(folder), to="hf", qtype="f16", adapter=None, variant=None,
                force=False, dtype="float32")
