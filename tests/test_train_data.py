"""Training data: loss masks for each JSONL shape, the chat template, truncation counts, packing, errors."""

from __future__ import annotations

import pytest
import torch

from finetune_helpers import tiny_tokenizer, write_jsonl
from gemmakit.errors import GemmaError
from gemmakit.train.data import ChatFormat, collate, load_jsonl, pack, split, step_rows
from gemmakit.train.loss import chunked_cross_entropy

TOK = tiny_tokenizer()


def _trained_text(ids, train):
    return TOK.decode([i for i, t in zip(ids, train, strict=True) if t], special=True)


def test_chat_rendering_matches_gemma3_template_and_masks_assistant_turns():
    msgs = [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "  hi there \n"},
        {"role": "assistant", "content": "hello!"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": " bye "},
    ]
    ids, train = ChatFormat(TOK, "gemma3").render(msgs)
    # spec §5.7: the system text is folded into the first user turn; contents trimmed.
    text = (
        "<bos><start_of_turn>user\nSYS\n\nhi there<end_of_turn>\n<start_of_turn>model\nhello!<end_of_turn>\n"
        "<start_of_turn>user\nq2<end_of_turn>\n<start_of_turn>model\nbye<end_of_turn>\n"
    )
    assert ids == TOK.encode(text, bos=False, special=True)
    assert _trained_text(ids, train) == "hello!<end_of_turn>bye<end_of_turn>"


def test_gemma2_template_refuses_system_and_roles_must_alternate():
    with pytest.raises(ValueError, match="no system role"):
        ChatFormat(TOK, "gemma2").render(
            [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]
        )
    with pytest.raises(GemmaError, match="alternate"):
        ChatFormat(TOK, "gemma3").render([{"role": "assistant", "content": "x"}])


def test_masks_per_shape_and_truncation_counts(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "the sea ", "completion": "is blue"},
            {"text": "one two"},
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            {"text": "a much longer line of text that will be cut"},
        ],
    )
    ex, stats = load_jsonl(path, TOK, "gemma3", max_len=20)
    assert stats.shapes == {"prompt": 1, "text": 2, "messages": 1}
    p, t, m, long = ex
    assert _trained_text(p.ids, p.train) == "is blue<eos>"
    assert TOK.decode([i for i, f in zip(p.ids, p.train, strict=True) if not f]) == "the sea "
    assert _trained_text(t.ids, t.train) == "one two<eos>" and not t.train[0]
    assert _trained_text(m.ids, m.train) == "b<end_of_turn>"
    assert len(long) == 20 and stats.truncated == 1
    full = len(TOK.encode("a much longer line of text that will be cut", bos=False)) + 2  # + <bos>, <eos>
    assert stats.tokens_cut == full - 20
    assert [e.line for e in ex] == [1, 2, 3, 4]


def test_malformed_lines_name_file_and_line(tmp_path):
    cases = [
        '{"text": "ok"}\n{"text": ',
        '{"text": "ok"}\n\n{"prompt": "x"}\n',
        "[1, 2]\n",
        '{"messages": [{"role": "user", "content": "x"}]}\n',
        '{"foo": 1}\n',
    ]
    lines = [2, 3, 1, 1, 1]
    for i, (text, line) in enumerate(zip(cases, lines, strict=True)):
        path = tmp_path / f"bad{i}.jsonl"
        path.write_text(text)
        with pytest.raises(GemmaError, match=rf"bad{i}\.jsonl:{line}: "):
            load_jsonl(path, TOK, "gemma3", max_len=64)


def test_collate_shifts_and_masks_padding():
    ex, _ = load_jsonl(
        write_jsonl(
            pytest.importorskip("pathlib").Path("/tmp") / "gk_collate.jsonl",
            [{"text": "one"}, {"prompt": "a", "completion": "two three"}],
        ),
        TOK,
        "gemma3",
        max_len=64,
    )
    b = collate(ex, TOK.pad_id)
    n0 = len(ex[0]) - 1
    assert b.ids.shape[1] == max(len(e) for e in ex) - 1
    assert b.targets[0, :n0].tolist() == ex[0].ids[1:] and (b.positions[0, n0:] == -1).all()
    assert b.mask[0, :n0].tolist() == ex[0].train[1:] and not b.mask[0, n0:].any()
    assert b.n_targets == ex[0].n_targets + ex[1].n_targets


def test_pack_split_and_step_rows_are_deterministic(tmp_path):
    ex, _ = load_jsonl(
        write_jsonl(tmp_path / "d.jsonl", [{"text": f"line {i} " * (i % 4 + 1)} for i in range(20)]),
        TOK,
        "gemma3",
        max_len=64,
    )
    rows = pack(ex, 32)
    assert all(len(r) <= 32 for r in rows) and sum(len(r) for r in rows) == sum(len(e) for e in ex)
    assert sum(r.n_targets for r in rows) == sum(e.n_targets for e in ex)
    a, v = split(ex, 0.2, seed=3)
    assert len(v) == 4 and len(a) == 16 and split(ex, 0.2, seed=3)[1][0].ids == v[0].ids
    seq = [step_rows(20, s, 8, seed=1) for s in range(5)]  # 40 rows = two shuffled epochs
    flat = [i for s in seq for i in s]
    assert sorted(flat[:20]) == list(range(20)) and sorted(flat[20:40]) == list(range(20))
    assert seq == [step_rows(20, s, 8, seed=1) for s in range(5)]


@pytest.mark.parametrize("cap", [None, 30.0])
def test_chunked_cross_entropy_equals_full_logits(cap):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    t, m = torch.randint(0, 50, (2, 9), generator=g), torch.rand(2, 9, generator=g) > 0.3
    loss = chunked_cross_entropy(h, w, t, m, softcap=cap, chunk=4)
    gh, gw = torch.autograd.grad(loss, (h, w))
    z = h @ w.T
    z = z if cap is None else cap * torch.tanh(z / cap)
    ref = torch.nn.functional.cross_entropy(z[m], t[m], reduction="sum")
    rh, rw = torch.autograd.grad(ref, (h, w))
    assert abs(loss.item() - ref.item()) < 1e-4
    assert (gh - rh).abs().max() < 1e-5 and (gw - rw).abs().max() < 1e-5


def test_chunked_cross_entropy_on_a_bf16_head_equals_fp32_softmax_of_its_logits():
    """bf16 base (the CPU default where bf16 is native): head matmul in bf16, log-sum-exp and softmax in fp32."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(3, 7, 16, generator=g).bfloat16().requires_grad_()
    w = torch.randn(50, 16, generator=g).bfloat16()
    t, m = torch.randint(0, 50, (3, 7), generator=g), torch.rand(3, 7, generator=g) > 0.2
    loss = chunked_cross_entropy(h, w, t, m, chunk=4)
    (gh,) = torch.autograd.grad(loss, h)
    hf = h.detach().float().requires_grad_()
    z = (hf @ w.float().T).bfloat16().float()  # the same bf16-rounded logits
    ref = torch.nn.functional.cross_entropy(z[m], t[m], reduction="sum")
    (rh,) = torch.autograd.grad(ref, hf)
    assert loss.dtype == torch.float32 and gh.dtype == torch.bfloat16
    assert abs(loss.item() - ref.item()) < 1e-3 * abs(ref.item())
    assert (gh.float() - rh).abs().max() < 0.02 * rh.abs().max()


def test_real_tokenizer_chat_rendering_matches_template_text():
    """On the embedded Gemma 3 vocabulary, turn-by-turn encoding equals encoding the rendered template."""
    from gemmakit.embedded import embedded_path
    from gemmakit.weights.gguf import read_gguf, tokenizer_from_gguf

    tok = tokenizer_from_gguf(read_gguf(embedded_path(progress=False)))
    msgs = [
        {"role": "system", "content": "You are Kit."},
        {"role": "user", "content": "How do I run `make test`?"},
        {"role": "assistant", "content": "Run it:\n\n  make test\n(it's offline)."},
        {"role": "user", "content": "Thanks! 日本語 too?"},
        {"role": "assistant", "content": "Yes 👍"},
    ]
    ids, _ = ChatFormat(tok, "gemma3").render(msgs)
    text = (
        "<bos><start_of_turn>user\nYou are Kit.\n\nHow do I run `make test`?<end_of_turn>\n<start_of_turn>model\n"
        "Run it:\n\n  make test\n(it's offline).<end_of_turn>\n<start_of_turn>user\nThanks! 日本語 too?"
        "<end_of_turn>\n<start_of_turn>model\nYes 👍<end_of_turn>\n"
    )
    assert ids == tok.encode(text, bos=False, special=True)
