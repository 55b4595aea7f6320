"""Tiny GGUF files for tests, written with ``gguf.GGUFWriter`` from a random transformers Llama.

The writer here is independent of qlora_jax's: it spells llama.cpp's tensor names and applies
llama.cpp's q/k row permutation itself (as llama.cpp's convert_hf_to_gguf.py does), so the oracle
(transformers' GGUF loader) checks our reading, not a copy of our own conventions.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import gguf
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# GGUF tensor names of a Hugging Face Llama layer's weights.
_LAYER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# Byte offset and count of float16 scale fields in one block of a K-quant type (the rest of a
# block may be any bytes; the scales must be finite for the dequantized tensor to be finite).
_K_SCALES = {"Q4_K": [(0, 2)], "Q5_K": [(0, 2)], "Q6_K": [(208, 1)], "Q2_K": [(80, 2)],
             "Q3_K": [(108, 1)]}


def tiny_llama(seed: int, hidden: int = 64, intermediate: int = 128, heads: int = 4,
               kv_heads: int = 2, layers: int = 2, vocab: int = 160, tied: bool = False
               ) -> torch.nn.Module:
    """A random float32 LlamaForCausalLM (norm weights near 1, biases none)."""
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate,
                                   num_hidden_layers=layers, num_attention_heads=heads,
                                   num_key_value_heads=kv_heads, vocab_size=vocab,
                                   max_position_embeddings=256, rope_theta=10000.0,
                                   rms_norm_eps=1e-5, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.1 * noise)
    if tied:
        model.tie_weights()
    return model.eval()


def _hf_permute(w: np.ndarray, heads: int) -> np.ndarray:
    # convert_hf_to_gguf.py LlamaModel.permute: rows of each head's two rotary halves interleaved.
    return (w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _encode(w: np.ndarray, type_name: str, rng: np.random.Generator) -> tuple[np.ndarray, Any]:
    """(data to write, ggml type); K-quants get random blocks with sane scales instead of ``w``."""
    qtype = gguf.GGMLQuantizationType[type_name]
    if type_name in _K_SCALES:
        block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
        rows = w.reshape(-1, w.shape[-1])
        blocks = rng.integers(0, 256, size=(rows.shape[0], rows.shape[1] // block, nbytes),
                              dtype=np.uint8)
        for offset, count in _K_SCALES[type_name]:
            scale = (rng.uniform(0.5, 1.5, blocks.shape[:2] + (count,)) * 2e-3).astype(np.float16)
            blocks[..., offset:offset + 2 * count] = scale.view(np.uint8)
        return blocks.reshape(rows.shape[0], -1), qtype
    return gguf.quants.quantize(np.ascontiguousarray(w, np.float32), qtype), qtype


def write_tiny_gguf(path: str, model: torch.nn.Module, weight_type: str = "F32",
                    seed: int = 0, tokens: Optional[list[str]] = None) -> str:
    """Writes ``model`` as a llama GGUF; 2-D weights in ``weight_type``, norms in F32."""
    cfg = model.config
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny-llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    if tokens is not None:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types([1] * len(tokens))
        w.add_token_merges([])
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    for key, arr in sd.items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if key == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif key == "model.norm.weight":
            name = "output_norm.weight"
        elif key == "lm_head.weight":
            name = "output.weight"
        else:
            parts = key.split(".")
            layer, module = parts[2], ".".join(parts[3:-1])
            name = f"blk.{layer}.{_LAYER[module]}.{parts[-1]}"
            if module == "self_attn.q_proj":
                arr = _hf_permute(arr, cfg.num_attention_heads)
            elif module == "self_attn.k_proj":
                arr = _hf_permute(arr, cfg.num_key_value_heads)
        if arr.ndim == 1:
            w.add_tensor(name, arr)
        else:
            data, qtype = _encode(arr, weight_type, rng)
            w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def transformers_gguf_logits(path: str, ids: np.ndarray) -> np.ndarray:
    """float32 logits of transformers' GGUF loader on ``path`` for ids ``[B, T]``."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()


def tiny_byte_tokenizer(vocab: int = 160, chat_template: Optional[str] = None) -> Any:
    """A byte-level BPE `qj.data.Tokenizer` of ``vocab`` tokens: 3 specials, then single bytes
    (space and the printable ASCII first) and 4 merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from qlora_jax.data.tokenizer import Tokenizer as QJTokenizer
    from qlora_jax.formats.gguf_vocab import byte_alphabet
    spell = byte_alphabet()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = [("h", "e"), ("l", "l"), (spell[32], "w"), ("he", "ll")]
    chars = [spell[b] for b in range(32, 32 + vocab - len(specials) - len(merges))]
    pieces = specials + chars + ["".join(m) for m in merges]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(pieces)}, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    return QJTokenizer(tok, {"bos": 1, "eos": 2, "pad": 0, "unk": None},
                       chat_template=chat_template)
