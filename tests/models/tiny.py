"""Tiny random checkpoints written by transformers, and comparison helpers, for model tests.

Every weight (biases and norms included) is drawn fresh, so a wrong layout,
a missing bias or a mis-scaled norm shows up in the outputs.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LLAMA_VARIANTS = ("llama_gqa", "llama3_rope", "mistral", "qwen2_tied")
VOCAB = 160


def llama_config(variant: str, layers: int = 2) -> Any:
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                  max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if variant == "llama_gqa":
        return transformers.LlamaConfig(**common, rope_theta=10000.0)
    if variant == "llama3_rope":
        return transformers.LlamaConfig(**common, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
            rope_theta=500000.0)
    if variant == "mistral":
        return transformers.MistralConfig(**common, sliding_window=5)
    if variant == "qwen2_tied":
        return transformers.Qwen2Config(**common, tie_word_embeddings=True)
    raise ValueError(variant)


def randomize(model: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    """Fills every parameter with fresh noise (norm weights around 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(scale * noise if p.ndim > 1 else 0.05 * noise)
    return model


def write_llama(directory: str, variant: str, seed: int, layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(llama_config(variant, layers))
    randomize(model, seed)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    model.save_pretrained(directory)
    return model


def write_bert(directory: str, model_type: str, seed: int, num_labels: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cls = transformers.RobertaConfig if model_type == "roberta" else transformers.BertConfig
    cfg = cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              vocab_size=120, max_position_embeddings=48,
              pad_token_id=1 if model_type == "roberta" else 0, num_labels=max(num_labels, 2))
    if num_labels:
        model = transformers.AutoModelForSequenceClassification.from_config(cfg)
    else:
        model = transformers.AutoModel.from_config(cfg)
    randomize(model, seed)
    model.eval()
    model.save_pretrained(directory)
    return model


def left_padded(rng: np.random.Generator, batch: int, length: int, vocab: int = VOCAB,
                pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random ids (never special ids 0-2) with random left padding in every row but the first."""
    ids = rng.integers(3, vocab, size=(batch, length))
    mask = np.ones((batch, length), np.int64)
    for b in range(1, batch):
        mask[b, : rng.integers(1, length // 2)] = 0
    ids[mask == 0] = pad_id
    return ids, mask


def rel_err(ours: Any, ref: Any, mask: Any = None) -> float:
    """``|ours - ref| / |ref|`` (Frobenius), over positions where ``mask`` is set."""
    a, b = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if mask is not None:
        m = np.asarray(mask).astype(bool)
        a, b = a[m], b[m]
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def cached_dir(factory: Any, name: str) -> tuple[str, bool]:
    d = str(factory.getbasetemp() / name)
    return d, os.path.isdir(d)
