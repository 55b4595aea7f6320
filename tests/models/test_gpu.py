"""The models on a GPU: Pallas 4-bit kernels under nn.scan, cuDNN/XLA attention, generate, offload remat.

Skipped without a GPU (CI is CPU-only); run on a GPU machine with
``python -m pytest tests/models/test_gpu.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import qlora_jax as qj
from tests.models import tiny

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")]


def test_qlora_forward_pallas_equals_xla_and_transformers(llama_ckpt, rng):
    path, ref = llama_ckpt("llama_gqa")
    ids, mask = tiny.left_padded(rng, 3, 12)
    with torch.no_grad():
        want = ref(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
    with jax.default_matmul_precision("highest"):
        model, params = qj.from_pretrained(path, dtype=jnp.float32)
        out = jax.jit(model.apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert tiny.rel_err(out, want, mask) < 1e-4
    lora = qj.LoraConfig(r=4, target_modules="all-linear", init="random")
    model, params = qj.from_pretrained(path, dtype=jnp.bfloat16, quant=qj.QuantConfig(),
                                       lora=lora)
    assert qj.quant.resolve_impl(model.impl) == "pallas"
    run = jax.jit(lambda m, p: m.apply({"params": p}, jnp.asarray(ids), jnp.asarray(mask)),
                  static_argnums=0)
    pallas = run(model, params)
    xla = run(model.clone(impl="xla"), params)
    assert tiny.rel_err(pallas, xla, mask) < 2e-2


def test_greedy_generate_equals_transformers_on_gpu(llama_ckpt, rng):
    path, ref = llama_ckpt("mistral")
    ids, mask = tiny.left_padded(rng, 2, 7)
    with torch.no_grad():
        want = ref.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                            max_new_tokens=8, do_sample=False, pad_token_id=0).numpy()
    with jax.default_matmul_precision("highest"):
        model, params = qj.from_pretrained(path, dtype=jnp.float32)
        out = np.asarray(qj.generate(model, params, ids, 8, attention_mask=mask))
    np.testing.assert_array_equal(out[:, :want.shape[1]], want)


@pytest.mark.parametrize("remat", ["full", "dots_saveable", "offload", "qkv", "attention"])
def _qlora_llama(llama_ckpt):
    """(model, trainable, frozen): the GQA test Llama, bf16, NF4 base, random r=4 adapters."""
    path, _ = llama_ckpt("llama_gqa")
    lora = qj.LoraConfig(r=4, target_modules="all-linear", init="random")
    model, params = qj.from_pretrained(path, dtype=jnp.bfloat16, quant=qj.QuantConfig(),
                                       lora=lora)
    trainable, frozen = qj.lora.partition(params)
    return model, trainable, frozen


def test_qlora_gradients_with_each_remat_mode(llama_ckpt, remat, rng):
    base, trainable, frozen = _qlora_llama(llama_ckpt)
    ids = jnp.asarray(rng.integers(3, tiny.VOCAB, (2, 16)))

    def grads(model):
        def loss(t):
            logits = model.apply({"params": qj.lora.combine(t, frozen)}, ids)
            return logits.astype(jnp.float32).mean()
        return jax.jit(jax.grad(loss))(trainable)

    g0, g1 = grads(base), grads(base.clone(remat=remat))
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.all(np.isfinite(b))
        assert np.linalg.norm(a - b) <= 2e-2 * np.linalg.norm(a) + 1e-6


def test_cudnn_attention_equals_xla_forward_and_gradients(llama_ckpt, rng):
    model, trainable, frozen = _qlora_llama(llama_ckpt)
    ids = jnp.asarray(rng.integers(3, tiny.VOCAB, (2, 32)))

    def run(m):
        def loss(t):
            logits = m.apply({"params": qj.lora.combine(t, frozen)}, ids).astype(jnp.float32)
            return jnp.mean(logits ** 2), logits
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)

    (_, cud), g_cud = run(model.clone(attention="cudnn"))
    (_, xla), g_xla = run(model.clone(attention="xla"))
    cud, xla = np.asarray(cud), np.asarray(xla)
    assert np.linalg.norm(cud - xla) <= 2e-2 * np.linalg.norm(xla)
    for a, b in zip(jax.tree.leaves(g_xla), jax.tree.leaves(g_cud)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.linalg.norm(a - b) <= 3e-2 * np.linalg.norm(a) + 1e-6
