"""Many adapters over one 4-bit base: stack_adapters and generate(adapter_index=...)."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlora_jax as qj
from qlora_jax.lora import tree as lp
from qlora_jax.models.llama import LlamaConfig, LlamaForCausalLM

gen = importlib.import_module("qlora_jax.generate")  # the module (qj.generate is the function)

CFG = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  max_position_embeddings=64)


def _model_and_adapters(rng, n: int):
    """A QLoRA tiny Llama (NF4 base, untied head) and ``n`` adapter sets with random B."""
    lora = qj.LoraConfig(r=4, alpha=8, target_modules="all-linear")
    model = LlamaForCausalLM(CFG, lora=lora, quant=qj.QuantConfig(), dtype=jnp.float32)
    base = model.init(jax.random.key(int(rng.integers(1 << 30))),
                      jnp.ones((1, 4), jnp.int32))["params"]
    trees = []
    for _ in range(n):
        flat = dict(lp.flatten(base))
        for path, leaf in flat.items():
            if path[-1] in ("lora_a", "lora_b"):
                flat[path] = jnp.asarray(rng.standard_normal(leaf.shape) * 0.3, leaf.dtype)
        trees.append(lp.unflatten(flat))
    return model, base, trees


@pytest.mark.slow
def test_stacked_rows_decode_as_their_adapter_alone(rng):
    model, _, trees = _model_and_adapters(rng, 3)
    stacked = qj.lora.stack_adapters(trees)
    a = lp.flatten(stacked)[("model", "layers", "self_attn", "q_proj", "lora_a")]
    assert a.shape == (2, 3, 32, 4)  # [L, N, in, R]: layer-major, adapter axis next
    ids = rng.integers(1, 97, (4, 6)).astype(np.int32)
    index = np.array([2, 0, 1, 2], np.int32)
    out = np.asarray(qj.generate(model, stacked, ids, 8, eos_token_id=[], adapter_index=index))
    alone = [np.asarray(qj.generate(model, t, ids, 8, eos_token_id=[])) for t in trees]
    for row, i in enumerate(index):
        np.testing.assert_array_equal(out[row], alone[i][row])
    # A prompt prefilled in chunks picks each row's adapter at every chunk too.
    chunked = qj.generate(model, stacked, ids, 8, eos_token_id=[], adapter_index=index,
                          prefill_chunk=4)
    np.testing.assert_array_equal(np.asarray(chunked), out)
    # The adapters differ enough that the rows really depend on which one is used.
    assert any(not np.array_equal(alone[0][r], alone[1][r]) for r in range(4))


def test_stacked_logits_equal_each_adapter(rng):
    model, _, trees = _model_and_adapters(rng, 2)
    stacked = qj.lora.stack_adapters(trees)
    ids = jnp.asarray(rng.integers(1, 97, (2, 5)).astype(np.int32))
    # float32 at full precision (GPUs otherwise run float32 dots in TF32: the gathered
    # adapter's batched einsum and the plain dot then round differently).
    with jax.default_matmul_precision("highest"):
        got = model.apply({"params": stacked}, ids, adapter_index=jnp.array([1, 0]))
        for row, i in enumerate((1, 0)):
            want = model.apply({"params": trees[i]}, ids)
            np.testing.assert_allclose(got[row], want[row], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_new_adapters_of_the_same_shapes_do_not_recompile(rng):
    model, _, trees = _model_and_adapters(rng, 4)
    ids = rng.integers(1, 97, (2, 5)).astype(np.int32)
    index = np.array([1, 0], np.int32)
    first = qj.lora.stack_adapters(trees[:2])
    qj.generate(model, first, ids, 4, eos_token_id=[], adapter_index=index)
    size = gen._generate._cache_size()
    second = qj.lora.stack_adapters(trees[2:])
    out = qj.generate(model, second, ids, 4, eos_token_id=[], adapter_index=index)
    assert gen._generate._cache_size() == size
    alone = np.asarray(qj.generate(model, trees[3], ids, 4, eos_token_id=[]))
    np.testing.assert_array_equal(np.asarray(out)[0], alone[0])


def test_bad_stacks_and_indices_are_refused(rng):
    model, base, trees = _model_and_adapters(rng, 2)
    ids = rng.integers(1, 97, (2, 5)).astype(np.int32)
    stacked = qj.lora.stack_adapters(trees)
    with pytest.raises(ValueError, match="at least two"):
        qj.lora.stack_adapters(trees[:1])
    with pytest.raises(ValueError, match="pass adapter_index"):
        qj.generate(model, stacked, ids, 2)
    with pytest.raises(ValueError, match=r"lie in \[0, 2\)"):
        qj.generate(model, stacked, ids, 2, adapter_index=np.array([0, 2]))
    with pytest.raises(ValueError, match=r"int \[B\] = \[2\]"):
        qj.generate(model, stacked, ids, 2, adapter_index=np.array([0]))
    with pytest.raises(ValueError, match="one adapter set"):
        qj.generate(model, trees[0], ids, 2, adapter_index=np.array([0, 1]))
    other = dict(lp.flatten(trees[1]))
    path = ("model", "layers", "mlp", "up_proj", "kernel")
    q = other[path]  # the same base but for one changed code byte
    other[path] = q.replace(packed=q.packed.at[0, 0].set(q.packed[0, 0] ^ 0x11))
    with pytest.raises(ValueError, match="differs from tree 0"):
        qj.lora.stack_adapters([trees[0], lp.unflatten(other)])
