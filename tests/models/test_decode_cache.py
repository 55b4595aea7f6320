"""The KV cache is updated in place at decode: one step copies no cache (compiled memory)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlora_jax as qj
from qlora_jax.models.llama import LlamaConfig, LlamaForCausalLM

LAYERS = 8


def _model(quant: bool) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=8, max_position_embeddings=4096)
    lora = qj.LoraConfig(r=2, target_modules="all-linear", init="random")
    return LlamaForCausalLM(cfg, lora=lora, quant=qj.QuantConfig(block_size=32) if quant else None)


def _step(model):
    return lambda params, tok, cache: model.apply({"params": params}, tok, cache=cache)


@pytest.mark.parametrize("quant", [False, True], ids=["float", "nf4"])
def test_a_decode_step_writes_the_donated_cache_in_place(quant):
    model = _model(quant)
    params = model.init(jax.random.key(0), jnp.ones((1, 2), jnp.int32))["params"]
    cache = model.init_cache(2, 1024)
    cache_bytes = cache.k.nbytes + cache.v.nbytes
    tok = jnp.ones((2, 1), jnp.int32)
    mem = jax.jit(_step(model), donate_argnums=2).lower(params, tok, cache).compile(
    ).memory_analysis()
    # The new cache lives in the donated one; the step's scratch holds at most a layer's slice
    # (read for attention) and activations: a new [L, B, S, G, K] stack a token would be
    # >= cache_bytes (the scan over per-layer slices built one: 1.4x the cache).
    assert mem.alias_size_in_bytes >= cache_bytes
    assert mem.temp_size_in_bytes < cache_bytes / 3, (mem.temp_size_in_bytes, cache_bytes)


def test_generate_copies_no_cache_in_its_decode_loop():
    """The compiled ``generate`` holds the cache in one buffer for every token: the only
    cache-shaped copy is the one that gives k and v their own buffers at the start (the scan over
    per-layer slices compiled to 4 and 1.4x the temp memory)."""
    import importlib

    gen = importlib.import_module("qlora_jax.generate")
    model = _model(False)
    params = model.init(jax.random.key(0), jnp.ones((1, 2), jnp.int32))["params"]
    ids = jnp.ones((2, 16), jnp.int32)
    compiled = gen._generate.lower(
        model, params, ids, jnp.ones_like(ids), jax.random.PRNGKey(0), jnp.float32(1e-6),
        jnp.float32(1.0), jnp.asarray([-1], jnp.int32), jnp.int32(0), None,
        max_new_tokens=1008, sample=False, use_top_p=False).compile()
    shape = model.init_cache(2, 1024).k.shape
    hlo_shape = "f32[" + ",".join(map(str, shape)) + "]"
    copies = [line for line in compiled.as_text().splitlines()
              if re.search(re.escape(hlo_shape) + r"\{[^}]*\} copy\(", line)]
    assert len(copies) <= 1, copies


def test_in_place_cache_steps_equal_the_full_forward(rng):
    model = _model(True)
    params = model.init(jax.random.key(1), jnp.ones((1, 2), jnp.int32))["params"]
    ids = jnp.asarray(rng.integers(3, 64, (2, 9)), jnp.int32)
    want = model.apply({"params": params}, ids)
    step = jax.jit(_step(model), donate_argnums=2)
    logits, cache = step(params, ids[:, :5], model.init_cache(2, 16))
    got = [logits]
    for t in range(5, 9):
        logits, cache = step(params, ids[:, t:t + 1], cache)
        got.append(logits)
    assert int(cache.index) == 9
    np.testing.assert_allclose(np.asarray(jnp.concatenate(got, axis=1)), np.asarray(want),
                               atol=2e-5, rtol=2e-5)
