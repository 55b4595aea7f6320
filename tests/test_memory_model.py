"""Tests of qlora_jax.memory: parameter counts against transformers, the byte accounting."""

import numpy as np
import pytest

from qlora_jax import memory as M


def test_llama_shapes_count_like_transformers(rng):
    """Parameter counts of small random Llama configs against transformers' model."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    heads = int(rng.choice([2, 4]))
    shape = M.ModelShape("tiny", hidden=16 * heads, intermediate=int(rng.integers(20, 90)),
                         layers=int(rng.integers(1, 4)), heads=heads, kv_heads=heads // 2,
                         vocab=int(rng.integers(50, 200)), tie_embeddings=bool(rng.integers(2)))
    cfg = transformers.LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                                   num_hidden_layers=shape.layers, num_attention_heads=heads,
                                   num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
                                   tie_word_embeddings=shape.tie_embeddings)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert shape.num_params == n, shape
    linear = sum(p.numel() for name, p in model.named_parameters()
                 if name.endswith("proj.weight"))
    assert shape.linear_params == linear, shape


def test_llama_8b_counts():
    s = M.LLAMA_8B
    assert s.num_params == 8_030_261_248  # Meta-Llama-3-8B
    assert s.lora_params(16) == 41_943_040  # PEFT's count for r=16 on all seven projections
    assert s.lora_params(8, ("q_proj", "v_proj")) == 32 * 8 * (8192 + 5120)


def test_breakdown_arithmetic(rng):
    s = M.LLAMA_8B
    p = M.Precision(weight=float(rng.choice([2, 4])), grad=2.0, optimizer=8.0, master=4.0)
    full = M.finetune_memory(s, "full", precision=p)
    assert full.total == pytest.approx(s.num_params * (p.weight + 2 + 8 + 4))
    assert full.trainable_params == s.num_params
    r = int(rng.integers(1, 65))
    lora = M.finetune_memory(s, "lora", r=r, precision=p)
    assert lora.weights == s.num_params * p.weight
    assert lora.adapters == pytest.approx(s.lora_params(r) * 16)
    q = M.finetune_memory(s, "qlora", r=r, precision=p)
    assert q.weights == pytest.approx(s.linear_params * 4.127 / 8
                                      + (s.num_params - s.linear_params) * p.weight, rel=1e-3)
    assert q.total < lora.total < full.total


def test_qlora_8b_near_measured_weights():
    """The 4-bit 8B weights: benchmarks/RESULTS.md measured 5.47 GiB on the device."""
    q = M.finetune_memory(M.LLAMA_8B, "qlora")
    assert q.weights / M.GIB == pytest.approx(5.47, rel=0.05)


def test_activation_memory_and_bad_input():
    a = M.activation_memory(M.LLAMA_8B, 1, 2048)
    device = ("saved_layer_inputs", "layer_internals", "logits")
    assert a["total"] == pytest.approx(sum(a[k] for k in device)) and a["host_layer_inputs"] == 0
    # Long rows: the layer inputs move to the host (L T D bf16: 64 GiB at 256k for llama-8b,
    # as XLA's host_temp measured), the chunked MLP holds [chunk, F] instead of [T, F].
    t = 262144
    full = M.activation_memory(M.LLAMA_8B, 1, t)
    off = M.activation_memory(M.LLAMA_8B, 1, t, remat="full_offload", mlp_chunk=8192)
    assert off["host_layer_inputs"] == full["saved_layer_inputs"] == 64 * M.GIB
    assert off["saved_layer_inputs"] == 0
    saved_mlp = (t - 8192) * 3 * M.LLAMA_8B.intermediate * 2
    assert full["layer_internals"] - off["layer_internals"] == pytest.approx(saved_mlp)
    assert M.activation_memory(M.LLAMA_8B, 1, 2048, mlp_chunk=8192) == a  # short rows: no chunks
    assert M.activation_memory(M.LLAMA_8B, 1, 2048, remat="none")["total"] > a["total"]
    with pytest.raises(ValueError, match="method"):
        M.finetune_memory(M.LLAMA_8B, "dora")
    with pytest.raises(ValueError, match="target"):
        M.LLAMA_8B.lora_params(8, ("qproj",))
    with pytest.raises(ValueError, match="remat"):
        M.activation_memory(M.LLAMA_8B, 1, 8, remat="offload")


@pytest.mark.slow
def test_compiled_step_memory_of_the_smoke_step():
    """The compiled smoke step: AdamW holds two float32 moments per trainable value, the 4-bit
    frozen linears take ~4.1 bits, and XLA's peak covers the state."""
    from qlora_jax import analysis

    out = M.compiled_step_memory(analysis.load_config("experiments/smoke.py"))
    assert out["optimizer"] == pytest.approx(2 * out["trainable"], abs=64)
    assert out["peak"] >= out["arguments"] >= out["frozen"] + out["trainable"] + out["optimizer"]
    assert out["aliased"] > 0  # the state is donated: the new state is written over it
    assert out["temp"] > 0
