"""Packed rows on a GPU: the fused Pallas segment kernel against XLA's segment-mask attention
(forward and gradients, llama-style head shapes), and a packed 4-bit Llama whose ``auto``
attention takes the fused kernel.

Skipped without a GPU; run with ``python -m pytest tests/models/test_packing_gpu.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlora_jax as qj
from qlora_jax.models import segments
from qlora_jax.models.llama import LlamaConfig, LlamaForCausalLM

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")]


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _segments(rng, b: int, t: int) -> jax.Array:
    seg = np.zeros((b, t), np.int32)
    for r in range(b):
        pos, i = 0, 1
        while pos < t - 8:
            n = int(rng.integers(8, t // 3))
            seg[r, pos:pos + n] = i
            pos, i = pos + n, i + 1
    return jnp.asarray(seg)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_fused_segment_attention_equals_xla(rng, head_dim):
    b, t, h, g = 2, 512, 8, 2
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, n, head_dim)), jnp.bfloat16)
               for n in (h, g, g))
    seg = _segments(rng, b, t)
    real = np.asarray(seg > 0)
    dy = jnp.where(jnp.asarray(real)[..., None, None],
                   jnp.asarray(rng.standard_normal((b, t, h, head_dim)), jnp.bfloat16), 0)
    scale = head_dim ** -0.5
    mask = segments.segment_mask(seg)
    f32 = lambda *a: tuple(x.astype(jnp.float32) for x in a)  # noqa: E731
    fused = jax.jit(lambda q, k, v: segments.fused_segment_attention(q, k, v, seg, scale))
    with jax.default_matmul_precision("highest"):
        xla = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, mask=mask, scale=scale, implementation="xla"))
        out_x, vjp_x = jax.vjp(xla, *f32(q, k, v))
        grads_x = vjp_x(dy.astype(jnp.float32))
    out_f, vjp_f = jax.vjp(fused, q, k, v)
    grads_f = vjp_f(dy)
    assert _rel(np.asarray(out_f, np.float32)[real], np.asarray(out_x)[real]) < 1e-2
    for a, b_ in zip(grads_f, grads_x):
        assert _rel(a.astype(jnp.float32), b_) < 2e-2


def test_packed_llama_auto_uses_the_fused_kernel(rng, monkeypatch):
    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    model = LlamaForCausalLM(cfg, quant=qj.QuantConfig(), dtype=jnp.bfloat16,
                             lora=qj.LoraConfig(r=8, target_modules="all-linear", init="random"))
    ids = jnp.asarray(rng.integers(3, 256, (2, 256)), jnp.int32)
    seg = _segments(rng, 2, 256)
    params = model.init(jax.random.PRNGKey(0), ids[:, :8])["params"]
    calls = []
    real_fn = segments.fused_segment_attention
    monkeypatch.setattr(segments, "fused_segment_attention",
                        lambda *a, **k: calls.append(1) or real_fn(*a, **k))
    trainable, frozen = qj.lora.partition(params)

    def loss(m, t):
        logits = m.apply({"params": qj.lora.combine(t, frozen)}, ids, segment_ids=seg)
        return jnp.sum(jnp.where((seg > 0)[..., None], logits.astype(jnp.float32), 0) ** 2)

    l_f, g_f = jax.value_and_grad(lambda t: loss(model, t))(trainable)
    assert calls, "auto attention did not take the fused kernel"
    l_x, g_x = jax.value_and_grad(lambda t: loss(model.clone(attention="xla"), t))(trainable)
    assert _rel(l_f, l_x) < 2e-2
    for a, b in zip(jax.tree.leaves(g_f), jax.tree.leaves(g_x)):
        assert _rel(a, b) < 5e-2
