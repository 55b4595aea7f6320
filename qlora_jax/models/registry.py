"""Model families by ``model_type`` (the field of a Hugging Face config.json)."""

from __future__ import annotations

from typing import Any, Mapping

from qlora_jax.models.bert import BertConfig, BertModel
from qlora_jax.models.llama import LlamaConfig, LlamaForCausalLM

#: model_type -> (family, config class, model class)
FAMILIES: dict[str, tuple[str, type, type]] = {
    "llama": ("llama", LlamaConfig, LlamaForCausalLM),
    "mistral": ("llama", LlamaConfig, LlamaForCausalLM),
    "qwen2": ("llama", LlamaConfig, LlamaForCausalLM),
    "bert": ("bert", BertConfig, BertModel),
    "roberta": ("bert", BertConfig, BertModel),
}


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def lookup(model_type: Any) -> tuple[str, type, type]:
    """(family, config class, model class) for a model_type.

    Raises:
      ValueError: an unknown model_type, naming it and listing the supported ones.
    """
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported by qlora_jax; supported "
                         f"model types: {', '.join(supported_model_types())}")
    return FAMILIES[model_type]


def build_model(hf_config: Mapping[str, Any], **attrs: Any) -> Any:
    """The (unbound) model for a config.json dict; ``attrs`` are model attributes
    (``dtype``, ``lora``, ``quant``, ``impl``, ``remat``, ``num_labels`` for encoders,
    ``mlp_chunk`` for the Llama family...)."""
    if "model_type" not in hf_config:
        raise ValueError("config.json has no 'model_type' field; supported model types: "
                         f"{', '.join(supported_model_types())}")
    family, config_cls, model_cls = lookup(hf_config["model_type"])
    num_labels = attrs.pop("num_labels", 0)
    if family != "llama":
        attrs.pop("mlp_chunk", None)  # encoders' rows are short: no chunked MLP
    if family == "bert":
        attrs["num_labels"] = int(num_labels or 0)
    elif num_labels:
        raise ValueError(f"num_labels={num_labels} applies to encoder models (BERT, RoBERTa); "
                         f"{hf_config['model_type']} is a causal LM")
    return model_cls(config_cls.from_hf(hf_config), **attrs)
