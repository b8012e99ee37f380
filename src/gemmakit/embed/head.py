"""The pooling head of an embedding model: what turns the encoder's hidden states into one unit vector per text.

A sentence-transformers folder lists its pipeline in modules.json (sentence-transformers `models/` docs): the
Transformer at the root, then Pooling (1_Pooling/config.json), Dense layers (N_Dense/config.json + weights) and
Normalize. EmbeddingGemma (300M) is mean pooling -> Dense 768->3072 -> Dense 3072->768 -> Normalize, with task
prompts in config_sentence_transformers.json. EmbeddingGemma 2's text model projects each token to embedding_dim
itself (HF-EG2 `embedding_projection`, here the head's `projection`) before mean pooling and Normalize.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import GemmaError

_ACTIVATIONS = {"torch.nn.modules.linear.Identity": nn.Identity, "torch.nn.modules.activation.Tanh": nn.Tanh}
_POOLING_MODES = ("pooling_mode_cls_token", "pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                  "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")


@dataclass
class HeadSpec:
    """What the folder says about the pipeline after the encoder (read once, used to build `Head`)."""

    dense: list[tuple[nn.Linear, nn.Module]] = field(default_factory=list)  # (linear, activation), in order
    normalize: bool = True
    prompts: dict[str, str] = field(default_factory=dict)  # name -> text prepended to the input
    default_prompt_name: str | None = None
    max_seq_length: int | None = None  # sentence_bert_config.json: the reference truncates there


class Head(nn.Module):
    """packed hidden (N, D) + lengths of the B texts in it -> (B, E) fp32 embeddings: [projection] -> mean ->
    dense... -> L2."""

    def __init__(self, spec: HeadSpec, projection: nn.Linear | None = None) -> None:
        super().__init__()
        self.projection = projection
        self.dense = nn.ModuleList(linear for linear, _ in spec.dense)
        self.activations = nn.ModuleList(act for _, act in spec.dense)
        self.normalize = spec.normalize

    @property
    def dim(self) -> int | None:
        if len(self.dense):
            return self.dense[-1].out_features
        return self.projection.out_features if self.projection is not None else None

    def forward(self, hidden: Tensor, lengths: list[int]) -> Tensor:
        # sentence-transformers Pooling (mean): sum over each text's tokens / their count
        x = torch.stack([part.sum(0) for part in hidden.float().split(lengths)])  # (B, D)
        x = x / torch.tensor(lengths, dtype=x.dtype, device=x.device)[:, None]
        if self.projection is not None:  # HF-EG2 projects every token; projecting the mean is the same linear map
            x = self.projection(x)
        for linear, act in zip(self.dense, self.activations, strict=True):
            x = act(linear(x))
        if self.normalize:  # sentence-transformers Normalize: F.normalize(p=2, eps=1e-12)
            x = nn.functional.normalize(x, p=2, dim=-1)
        return x


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise GemmaError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); fix or re-download it") from None


def _module_kind(entry: dict[str, Any]) -> str:
    """'Transformer', 'Pooling', 'Dense', 'Normalize' from the module's class path (any sentence-transformers era)."""
    return str(entry.get("type", "")).rsplit(".", 1)[-1]


def _read_dense(folder: Path) -> tuple[nn.Linear, nn.Module]:
    from ..weights.hf import _read_weights, _weight_files

    conf = _json(folder / "config.json")
    act_name = conf.get("activation_function", "torch.nn.modules.linear.Identity")
    if act_name not in _ACTIVATIONS:
        raise GemmaError(f"{folder}: Dense activation {act_name!r} is not supported (Identity or Tanh)")
    state = {}
    for f in _weight_files(folder):
        state.update(_read_weights(f, torch.float32))
    linear = nn.Linear(int(conf["in_features"]), int(conf["out_features"]), bias=bool(conf.get("bias", True)))
    want = {"linear.weight"} | ({"linear.bias"} if linear.bias is not None else set())
    if set(state) != want:
        raise GemmaError(f"{folder}: Dense weights are {sorted(state)}, expected {sorted(want)}; the folder is damaged")
    with torch.no_grad():
        linear.weight.copy_(state["linear.weight"])
        if linear.bias is not None:
            linear.bias.copy_(state["linear.bias"])
    return linear.eval(), _ACTIVATIONS[act_name]()


def read_sentence_transformers(folder: Path) -> HeadSpec:
    """The pipeline a sentence-transformers folder declares; anything gemmakit would compute differently is refused."""
    modules = _json(folder / "modules.json")
    spec = HeadSpec(normalize=False)
    kinds = [_module_kind(m) for m in modules]
    if not kinds or kinds[0] != "Transformer" or modules[0].get("path", "") not in ("", "."):
        raise GemmaError(f"{folder}/modules.json does not start with a Transformer at the folder's root; not an "
                         "EmbeddingGemma-style sentence-transformers folder")
    for entry, kind in zip(modules[1:], kinds[1:], strict=True):
        sub = folder / entry.get("path", "")
        if kind == "Pooling":
            _check_pooling(_json(sub / "config.json"), sub)
        elif kind == "Dense":
            spec.dense.append(_read_dense(sub))
        elif kind == "Normalize":
            spec.normalize = True
        else:
            raise GemmaError(f"{folder}/modules.json has a {kind!r} module; gemmakit runs Transformer -> Pooling "
                             "(mean) -> Dense -> Normalize pipelines")
    if "Pooling" not in kinds:
        raise GemmaError(f"{folder}/modules.json has no Pooling module; gemmakit needs mean pooling")
    if (p := folder / "config_sentence_transformers.json").exists():
        conf = _json(p)
        spec.prompts = {str(k): str(v) for k, v in (conf.get("prompts") or {}).items()}
        spec.default_prompt_name = conf.get("default_prompt_name") or None
    if (p := folder / "sentence_bert_config.json").exists():
        spec.max_seq_length = _json(p).get("max_seq_length")
    return spec


def _check_pooling(conf: dict[str, Any], folder: Path) -> None:
    other = [m for m in _POOLING_MODES if conf.get(m)]
    if not conf.get("pooling_mode_mean_tokens") or other:
        raise GemmaError(f"{folder}: pooling is {other or 'not mean'}; gemmakit implements mean pooling only")
    if conf.get("include_prompt", True) is False:
        raise GemmaError(f"{folder}: include_prompt=false (the prompt left out of the mean) is not supported")
