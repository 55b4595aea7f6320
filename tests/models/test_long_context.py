"""Long rows: the sequence-chunked MLP (`mlp_chunk`) and host-offloaded layer inputs
(`remat="full_offload"`) give today's logits, loss and gradients (float32, 1e-5), and really
change what the compiled step keeps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlora_jax as qj
from qlora_jax.lora.tree import flatten, unflatten
from qlora_jax.models.chunking import map_chunks
from qlora_jax.models.llama import LlamaConfig, LlamaForCausalLM

CFG = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=256)


def _model_params(rng, quant, **kw):
    """A tiny Llama with LoRA on every linear layer; adapters random (B non-zero)."""
    model = LlamaForCausalLM(CFG, lora=qj.LoraConfig(r=4, target_modules="all-linear"),
                             quant=quant, dtype=jnp.float32, **kw)
    params = jax.jit(model.init)(jax.random.key(int(rng.integers(1 << 30))),
                                 jnp.ones((1, 8), jnp.int32))["params"]
    flat = flatten(params)
    for path, leaf in sorted(flat.items()):
        if path[-1] in ("lora_a", "lora_b"):
            flat[path] = jnp.asarray(rng.normal(0, 0.2, leaf.shape), leaf.dtype)
    return model, unflatten(flat)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-30))


def test_map_chunks_equals_the_whole_row_for_any_length(rng):
    w = jnp.asarray(rng.normal(size=(8, 8)), jnp.float32)
    fn = lambda x, j: jnp.tanh(x @ w) * 2.0  # noqa: E731
    for t in (5, 16, 23):
        h = jnp.asarray(rng.normal(size=(2, t, 8)), jnp.float32)
        np.testing.assert_allclose(map_chunks(fn, h, 8), fn(h, 0), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="chunk must be positive"):
        map_chunks(fn, h, 0)


@pytest.mark.parametrize("quant", [None, qj.QuantConfig()], ids=["float", "nf4"])
def test_chunked_mlp_logits_equal_whole_rows_also_packed(rng, quant):
    model, params = _model_params(rng, quant, mlp_chunk=0)
    ids = jnp.asarray(rng.integers(0, CFG.vocab_size, (2, 29)), jnp.int32)
    seg = jnp.asarray(np.repeat([[1] * 11 + [2] * 13 + [0] * 5], 2, 0), jnp.int32)
    # 29 tokens in chunks of 8: the last chunk is padded.
    for kw in ({"segment_ids": seg},) if quant else ({}, {"segment_ids": seg}):
        ref = jax.jit(model.apply)({"params": params}, ids, **kw)
        out = jax.jit(model.clone(mlp_chunk=8).apply)({"params": params}, ids, **kw)
        assert _rel(out, ref) < 1e-5, kw.keys()


def _loss_and_lora_grads(model, params, ids, targets):
    trainable, frozen = qj.lora.partition(params)

    def loss(t):
        logits = model.apply({"params": qj.lora.combine(t, frozen)}, ids)
        lp = jax.nn.log_softmax(logits.astype(jnp.float32))
        return -jnp.take_along_axis(lp, targets[..., None], -1).mean()
    value, grads = jax.jit(jax.value_and_grad(loss))(trainable)
    return value, {k: v for k, v in flatten(grads).items() if v is not None}


@pytest.mark.parametrize("quant", [None, qj.QuantConfig()], ids=["float", "nf4"])
def test_offloaded_and_chunked_step_equal_todays_loss_and_gradients(rng, quant):
    model, params = _model_params(rng, quant, mlp_chunk=0)
    ids = jnp.asarray(rng.integers(0, CFG.vocab_size, (2, 24)), jnp.int32)
    targets = jnp.roll(ids, -1, axis=1)
    ref_loss, ref_grads = _loss_and_lora_grads(model, params, ids, targets)
    assert len(ref_grads) == 2 * 7 and all(float(jnp.abs(g).max()) > 0 for g in ref_grads.values())
    combos = (("full_offload", 8),) if quant else (("full_offload", 8), ("none", 5))
    for remat, chunk in combos:
        loss, grads = _loss_and_lora_grads(model.clone(remat=remat, mlp_chunk=chunk), params,
                                           ids, targets)
        assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss)), (remat, chunk)
        for k, g in grads.items():
            assert _rel(g, ref_grads[k]) < 1e-5, (remat, chunk, k)


def _grad_jaxpr(model, params, ids):
    trainable, frozen = qj.lora.partition(params)
    return str(jax.make_jaxpr(jax.grad(lambda t: model.apply(
        {"params": qj.lora.combine(t, frozen)}, ids).astype(jnp.float32).sum()))(trainable))


def test_full_offload_keeps_the_layer_inputs_in_host_memory(rng):
    model, params = _model_params(rng, None, remat="full")
    ids = jnp.asarray(rng.integers(0, CFG.vocab_size, (1, 16)), jnp.int32)
    full = _grad_jaxpr(model, params, ids)
    host = _grad_jaxpr(model.clone(remat="full_offload"), params, ids)
    assert "<host>" not in full
    # The layer loop's stacked residual: one [L, B, T, D] buffer in host memory.
    shape = f"<host>[{CFG.num_hidden_layers},1,16,{CFG.hidden_size}]"
    assert shape in host, "remat='full_offload' did not move the layer inputs to the host"


def test_chunked_mlp_lowers_the_compiled_peak(rng):
    big = LlamaConfig(**{**CFG.__dict__, "intermediate_size": 1024, "num_hidden_layers": 1})
    model = LlamaForCausalLM(big, lora=qj.LoraConfig(r=4, target_modules="all-linear"),
                             dtype=jnp.float32, remat="full", mlp_chunk=0)
    params = model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
    ids = jnp.asarray(rng.integers(0, big.vocab_size, (1, 512)), jnp.int32)

    trainable, frozen = qj.lora.partition(params)

    def temp_bytes(m):
        f = jax.jit(jax.grad(lambda t: m.apply({"params": qj.lora.combine(t, frozen)},
                                               ids).sum()))
        return f.lower(trainable).compile().memory_analysis().temp_size_in_bytes

    whole, chunked = temp_bytes(model), temp_bytes(model.clone(mlp_chunk=64))
    act = 512 * 1024 * 4  # one [T, F] float32 activation
    assert chunked < whole - 2 * act, (whole, chunked)
