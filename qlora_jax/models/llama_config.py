"""``LlamaConfig``: the fields of a Llama / Mistral / Qwen2 ``config.json`` the model uses.

Parsing (transformers 4 and 5 rope fields, Mistral's sliding window, Qwen2's biases) and writing
back (``to_hf`` keeps every original field) live here; the modules are in ``models.llama``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Optional

import jax

from qlora_jax.models.common import Rope, make_rope

MODEL_TYPES = ("llama", "mistral", "qwen2")
#: ``hidden_act`` values and their functions.
ACTIVATIONS = {"silu": jax.nn.silu, "gelu": lambda x: jax.nn.gelu(x, approximate=False),
               "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The fields of a Llama/Mistral/Qwen2 ``config.json`` that the model uses.

    ``raw_json`` keeps the whole original config.json so that ``save_pretrained``
    writes back every field transformers knows about.
    """

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: Optional[int] = None
    hidden_act: str = "silu"
    bos_token_id: Optional[int] = None
    eos_token_id: Any = None
    pad_token_id: Optional[int] = None
    raw_json: str = "{}"

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> "LlamaConfig":
        """Parses a config.json dict (transformers 4 or 5 style rope fields)."""
        mt = d.get("model_type", "llama")
        if mt not in MODEL_TYPES:
            raise ValueError(f"LlamaConfig: model_type {mt!r} is not one of {MODEL_TYPES}")
        heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        head_dim = d.get("head_dim") or hidden // heads
        rp = d.get("rope_parameters")
        if isinstance(rp, Mapping) and rp:
            theta = float(rp.get("rope_theta", d.get("rope_theta", 10000.0)))
            scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
        else:
            theta = float(d.get("rope_theta", 10000.0))
            scaling = dict(d.get("rope_scaling") or {})
        act = d.get("hidden_act", "silu")
        if act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
        window = None
        if mt == "mistral":
            window = d.get("sliding_window")
        elif mt == "qwen2" and d.get("use_sliding_window"):
            raise ValueError("Qwen2 with use_sliding_window=true is not supported (per-layer "
                             "sliding windows); set use_sliding_window=false")
        qkv_bias = bool(d.get("attention_bias", False)) or mt == "qwen2"
        eos = d.get("eos_token_id")
        if isinstance(eos, list):
            eos = tuple(eos)
        cfg = cls(
            model_type=mt, vocab_size=int(d["vocab_size"]), hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]), num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads), head_dim=int(head_dim),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=theta,
            rope_scaling=tuple(sorted((k, _hashable(v)) for k, v in scaling.items())),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias, o_bias=bool(d.get("attention_bias", False)) and mt != "qwen2",
            mlp_bias=bool(d.get("mlp_bias", False)), sliding_window=window, hidden_act=act,
            bos_token_id=d.get("bos_token_id"), eos_token_id=eos,
            pad_token_id=d.get("pad_token_id"), raw_json=json.dumps(dict(d), sort_keys=True))
        cfg.rope()  # validates rope_type early
        return cfg

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict (the original fields, with this config's values)."""
        d = json.loads(self.raw_json)
        d.update(model_type=self.model_type, vocab_size=self.vocab_size,
                 hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                 num_hidden_layers=self.num_hidden_layers,
                 num_attention_heads=self.num_attention_heads,
                 num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
                 rms_norm_eps=self.rms_norm_eps, tie_word_embeddings=self.tie_word_embeddings,
                 max_position_embeddings=self.max_position_embeddings)
        if self.model_type == "qwen2":
            d.pop("head_dim", None)
        d.setdefault("architectures", [ARCHITECTURES[self.model_type]])
        if "rope_parameters" not in d and "rope_theta" not in d:
            d["rope_parameters"] = dict(rope_theta=self.rope_theta, **dict(self.rope_scaling)) \
                if self.rope_scaling else {"rope_theta": self.rope_theta, "rope_type": "default"}
        return d

    def rope(self) -> Rope:
        return make_rope(self.head_dim, self.rope_theta, dict(self.rope_scaling),
                         self.max_position_embeddings)


#: The transformers class of each model_type (``config.json``'s ``architectures``).
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM"}


def _hashable(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(v)
    if isinstance(v, dict):
        return tuple(sorted(v.items()))
    return v
