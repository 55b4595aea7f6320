"""Model families (Flax linen, LoRA/QLoRA-ready): Llama (Llama, Mistral, Qwen2) and BERT
(BERT, RoBERTa, MiniLM). See ``llama.py`` and ``bert.py`` for the params trees and call API."""

from qlora_jax.models.base import LoraModelMixin
from qlora_jax.models.bert import BertConfig, BertModel
from qlora_jax.models.common import KVCache
from qlora_jax.models.llama import LlamaConfig, LlamaForCausalLM
from qlora_jax.models.registry import FAMILIES, build_model, lookup, supported_model_types

__all__ = ["BertConfig", "BertModel", "FAMILIES", "KVCache", "LlamaConfig", "LlamaForCausalLM",
           "LoraModelMixin", "build_model", "lookup", "supported_model_types"]
