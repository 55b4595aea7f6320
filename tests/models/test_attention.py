"""The attention implementation chooser and the XLA path against a float64 reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.models.common import attention_impl, causal_mask, dot_product_attention


def _reference(q, k, v, visible, scale):
    """float64 softmax attention with GQA by repeating key/value heads."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    rep = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    s = np.einsum("bthk,bshk->bhts", q, k) * scale
    s = np.where(visible, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshk->bthk", p, v)


def test_auto_resolves_to_xla_off_gpu_and_with_a_mask():
    q = jnp.zeros((1, 4, 2, 16), jnp.bfloat16)
    want = "cudnn" if jax.default_backend() == "gpu" else "xla"
    assert attention_impl("auto", q, None) == want
    assert attention_impl("auto", q, jnp.ones((1, 1, 4, 4), bool)) == "xla"
    assert attention_impl("auto", q.astype(jnp.float32), None) == "xla"
    assert attention_impl("xla", q, None) == "xla"


def test_bad_choices_raise():
    q = jnp.zeros((1, 4, 2, 16), jnp.bfloat16)
    with pytest.raises(ValueError, match="attention='flash'"):
        attention_impl("flash", q, None)
    with pytest.raises(ValueError, match="without an explicit mask"):
        dot_product_attention(q, q, q, jnp.ones((1, 1, 4, 4), bool), 0.25, "cudnn")


# float32 against float64: on CPU the error is float32 rounding (~1e-7 a product, < 1e-5 on
# values near 1). On a GPU the matmuls run at HIGHEST precision (true float32, not TF32's 10-bit
# mantissa) and XLA lowers exp and the division to approximate PTX instructions (a few ulp), so
# the bound is a little wider there.
F64_TOL = 1e-5 if jax.default_backend() == "cpu" else 5e-5


@pytest.mark.parametrize("masked", [False, True])
def test_xla_attention_matches_float64(masked, rng):
    b, t, h, g, k = 2, 9, 4, 2, 16
    q, kk, v = (rng.standard_normal((b, t, n, k)).astype(np.float32) for n in (h, g, g))
    valid = np.ones((b, t), bool)
    valid[1, :3] = False  # left padding in the second row
    visible = np.asarray(causal_mask(jnp.arange(t), jnp.asarray(valid)))
    mask = jnp.asarray(visible) if masked else None
    if not masked:
        visible = np.broadcast_to(np.tril(np.ones((t, t), bool)), (b, 1, t, t))
    with jax.default_matmul_precision("highest"):
        out = dot_product_attention(jnp.asarray(q), jnp.asarray(kk), jnp.asarray(v), mask,
                                    k ** -0.5, "xla")
    want = _reference(q, kk, v, visible, k ** -0.5)
    rows = valid if masked else np.ones_like(valid)
    err = np.abs(np.asarray(out, np.float64) - want)[rows]
    assert err.max() < F64_TOL, err.max()


def test_right_padded_task_drops_the_mask_and_keeps_the_loss(rng):
    """A right-padded causal-LM batch scores the same with and without its attention mask."""
    import optax  # noqa: F401  (the train package imports it)

    import qlora_jax as qj
    from qlora_jax.models.llama import LlamaConfig, LlamaForCausalLM
    from qlora_jax.train.task import Task

    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      max_position_embeddings=64)
    model = LlamaForCausalLM(cfg, lora=qj.LoraConfig(r=2, target_modules="all-linear",
                                                     init="random"))
    b, t = 3, 12
    params = jax.jit(model.init)(jax.random.key(int(rng.integers(1 << 30))),
                                 jnp.ones((1, t), jnp.int32))["params"]
    ids = rng.integers(1, cfg.vocab_size, (b, t)).astype(np.int32)
    lengths = np.array([t, t - 4, t // 2])
    attn = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    loss_mask = (np.arange(t)[None] < lengths[:, None] - 1).astype(np.float32)
    batch = {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask,
             "targets": np.roll(ids, -1, axis=1)}
    masked, unmasked = Task(model, "causal_lm"), Task(model, "causal_lm", right_padded=True)
    with jax.default_matmul_precision("highest"):  # float32 on GPUs too (not TF32)
        want = [float(x) for x in jax.jit(masked.sums)(params, batch)]
        got = [float(x) for x in jax.jit(unmasked.sums)(params, batch)]
        # The mask really was dropped: padded slots (no loss) now see the padding before them.
        a = np.asarray(jax.jit(masked.logits)(params, batch))
        c = np.asarray(jax.jit(unmasked.logits)(params, batch))
    np.testing.assert_allclose(got, want, rtol=2e-6)
    real = attn.astype(bool)
    np.testing.assert_allclose(c[real], a[real], rtol=1e-5, atol=1e-5)
    assert np.abs(c[~real] - a[~real]).max() > 1e-3
