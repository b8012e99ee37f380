"""LoRA and QLoRA: zero-init is a no-op, merge equals adapter-on, PEFT + transformers read our adapters (and we
read theirs) with the same logits, quantized bases let gradients through."""

from __future__ import annotations

import pytest
import torch

import gemmakit
from finetune_helpers import tiny_model_folder
from gemmakit.errors import GemmaError
from gemmakit.lora import LoRAConfig, LoRALinear, inject, load_adapter, merge, save_adapter, unload
from gemmakit.quant.weight_only import Int4Linear, Int8Linear, dequantize_model, quantize_model
from helpers import TINY, assert_close

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def folder(request, tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp(request.param), request.param)


def _load(folder, **kw):
    return gemmakit.load(folder, dtype="float32", device="cpu", quant=None, progress=False, **kw)


def _randomize(module, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


IDS = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))


def test_zero_init_leaves_logits_unchanged(folder):
    m = _load(folder)
    before = m.logits(IDS)
    wrapped = inject(m.module, LoRAConfig(r=4, alpha=8, targets=ALL))
    assert len(wrapped) == 7 * m.config.num_hidden_layers
    assert torch.equal(m.logits(IDS), before)
    trainable = [n for n, p in m.module.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)


def test_merge_equals_adapter_on_and_unload_restores(folder):
    m = _load(folder)
    base = m.logits(IDS)
    inject(m.module, LoRAConfig(r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj")))
    _randomize(m.module)
    on = m.logits(IDS)
    assert (on - base).abs().max() > 1e-2  # the adapter does something
    m2 = _load(folder)
    inject(m2.module, LoRAConfig(r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj")))
    m2.module.load_state_dict(m.module.state_dict())
    merge(m2.module)
    assert not any(isinstance(x, LoRALinear) for x in m2.module.modules())
    assert_close(m2.logits(IDS), on, ulps=512)
    unload(m.module)
    assert torch.equal(m.logits(IDS), base)


def test_peft_reads_our_adapter_with_same_logits(folder, tmp_path):
    import peft
    import transformers

    m = _load(folder)
    inject(
        m.module, LoRAConfig(r=4, alpha=16, targets=("q_proj", "k_proj", "o_proj", "gate_proj", "up_proj"))
    )
    _randomize(m.module)
    save_adapter(m.module, tmp_path)
    ours = m.logits(IDS)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    pm = peft.PeftModel.from_pretrained(ref, tmp_path).eval()
    with torch.no_grad():
        theirs = pm(IDS).logits
    assert_close(ours, theirs, ulps=512)
    # and the loader path: load(..., adapter=)
    assert_close(_load(folder, adapter=tmp_path).logits(IDS), theirs, ulps=512)


def test_we_read_a_peft_saved_adapter(folder, tmp_path):
    import peft
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    pm = peft.get_peft_model(
        ref,
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["v_proj", "down_proj"],
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        ),
    )
    pm.save_pretrained(tmp_path)
    with torch.no_grad():
        theirs = pm.eval()(IDS).logits
    assert_close(_load(folder, adapter=tmp_path).logits(IDS), theirs, ulps=512)


def test_adapter_for_another_model_is_refused(tmp_path):
    a = gemmakit.loader.build(TINY["gemma3"], _random_state(TINY["gemma3"]))
    inject(a, LoRAConfig(r=4, targets=("q_proj",)))
    save_adapter(a, tmp_path)
    other = TINY["gemma3"].replace(hidden_size=32, intermediate_size=64)
    b = gemmakit.loader.build(other, _random_state(other))
    with pytest.raises(GemmaError, match="shape"):
        load_adapter(b, tmp_path)
    with pytest.raises(GemmaError, match="no adapter_config.json"):
        load_adapter(b, tmp_path / "nope")


def _random_state(cfg):
    from gemmakit.model import Gemma

    torch.manual_seed(0)
    return {k: v.normal_(0, 0.05) for k, v in Gemma(cfg).state_dict().items()}


@pytest.mark.parametrize("mode,cls,tol", [("int8", Int8Linear, 0.01), ("int4", Int4Linear, 0.2)])
def test_quantized_linear_is_close_and_reversible(mode, cls, tol):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=False)
    root = torch.nn.Sequential(lin)
    quantize_model(root, mode)
    q = root[0]
    assert isinstance(q, cls) and root.quantization["mode"] == mode
    x = torch.randn(5, 64)
    rel = (q(x) - lin(x)).norm() / lin(x).norm()
    assert rel < tol
    dequantize_model(root)
    assert isinstance(root[0], torch.nn.Linear)
    assert torch.equal(root[0](x), q(x))


def test_qlora_gradients_flow_through_quantized_base(folder):
    m = _load(folder)
    quantize_model(m.module, "int4")
    inject(m.module, LoRAConfig(r=4, alpha=8, targets=("q_proj", "up_proj")))
    _randomize(m.module)
    m.module.train()
    loss = m.module(IDS).logsumexp(-1).mean()
    loss.backward()
    grads = {n: p.grad for n, p in m.module.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert not any(b.requires_grad for b in m.module.buffers())
    merged = merge(m.module)
    assert not any(isinstance(x, LoRALinear | Int4Linear) for n, x in merged.named_modules() if "q_proj" in n)
