"""Packed rows in the Llama family: each example's logits and gradients in a packed row equal
those of the example alone (Llama with GQA, Mistral with a sliding window, Qwen2 with q/k/v
biases and tied embeddings; LoRA on float and 4-bit bases), and the fused segment kernel (Pallas
interpret mode on CPU) equals the XLA segment-mask path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlora_jax as qj
from qlora_jax.models import segments
from qlora_jax.models.llama import LlamaConfig, LlamaForCausalLM

VOCAB = 96
# (variant, config fields): GQA; a window shorter than the examples; biases + tied embeddings.
VARIANTS = {
    "llama": dict(model_type="llama"),
    "mistral": dict(model_type="mistral", sliding_window=4),
    "qwen2": dict(model_type="qwen2", qkv_bias=True, tie_word_embeddings=True),
}


def _model(variant: str, quant: bool, **kw) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      **VARIANTS[variant])
    return LlamaForCausalLM(cfg, quant=qj.QuantConfig() if quant else None, impl="xla",
                            lora=qj.LoraConfig(r=4, target_modules="all-linear", init="random"),
                            **kw)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _pack(rng, rows: list[list[int]], t: int):
    """Random examples of the given lengths packed into rows of ``t`` tokens (padding after)."""
    ids = np.zeros((len(rows), t), np.int32)
    seg = np.zeros((len(rows), t), np.int32)
    pos = np.zeros((len(rows), t), np.int32)
    examples = []  # (row, start, ids)
    for r, lengths in enumerate(rows):
        start = 0
        for i, n in enumerate(lengths):
            x = rng.integers(3, VOCAB, n)
            ids[r, start:start + n], seg[r, start:start + n] = x, i + 1
            pos[r, start:start + n] = np.arange(n)
            examples.append((r, start, x))
            start += n
    return jnp.asarray(ids), jnp.asarray(seg), jnp.asarray(pos), examples


# Each family once in the fast tier (4-bit and float bases both covered), the rest slow.
@pytest.mark.parametrize("variant,quant", [
    ("llama", True), ("mistral", False), ("qwen2", True),
    pytest.param("llama", False, marks=pytest.mark.slow),
    pytest.param("mistral", True, marks=pytest.mark.slow),
    pytest.param("qwen2", False, marks=pytest.mark.slow)])
def test_packed_logits_and_grads_equal_each_example_alone(rng, variant, quant):
    # "Alone": every example in a row of its own, starting at slot 0 with positions 0.., padded
    # after its end (causal attention: the trailing padding cannot reach its tokens).
    model = _model(variant, quant)
    ids, seg, pos, examples = _pack(rng, [[7, 11, 5], [9, 13]], 28)
    longest = max(len(x) for _, _, x in examples)
    alone_ids = np.zeros((len(examples), longest), np.int32)
    for i, (_, _, x) in enumerate(examples):
        alone_ids[i, :len(x)] = x
    params = model.init(jax.random.PRNGKey(int(rng.integers(1 << 30))), ids[:1, :4])["params"]
    trainable, frozen = qj.lora.partition(params)
    weights = jnp.asarray(rng.standard_normal((28, VOCAB)), jnp.float32)
    alone_w = np.zeros((len(examples), longest, VOCAB), np.float32)
    for i, (_, start, x) in enumerate(examples):
        alone_w[i, :len(x)] = weights[start:start + len(x)]

    @jax.jit
    def packed(t):
        def loss(t):
            logits = model.apply({"params": qj.lora.combine(t, frozen)}, ids, segment_ids=seg,
                                 position_ids=pos)
            return jnp.sum(jnp.where((seg > 0)[..., None], logits * weights, 0)), logits
        return jax.value_and_grad(loss, has_aux=True)(t)

    @jax.jit
    def alone(t):
        def loss(t):
            logits = model.apply({"params": qj.lora.combine(t, frozen)}, jnp.asarray(alone_ids))
            return jnp.sum(logits * alone_w), logits
        return jax.value_and_grad(loss, has_aux=True)(t)

    with jax.default_matmul_precision("highest"):
        (l_packed, logits), g_packed = packed(trainable)
        (l_alone, want), g_alone = alone(trainable)
    assert float(jnp.std(logits)) > 0.1
    for i, (r, start, x) in enumerate(examples):
        assert _rel(logits[r, start:start + len(x)], want[i, :len(x)]) < 1e-5
    assert _rel(l_packed, l_alone) < 1e-5
    leaves_p, leaves_a = jax.tree.leaves(g_packed), jax.tree.leaves(g_alone)
    assert len(leaves_p) == len(leaves_a) > 0
    for a, b in zip(leaves_p, leaves_a):
        assert _rel(a, b) < 1e-5


def test_positions_default_to_restarting_in_each_segment(rng):
    model = _model("llama", False)
    ids, seg, pos, _ = _pack(rng, [[6, 10], [16]], 20)
    params = model.init(jax.random.PRNGKey(0), ids[:1, :4])["params"]
    np.testing.assert_array_equal(segments.positions_from_segments(seg)[seg > 0], pos[seg > 0])
    want = model.apply({"params": params}, ids, segment_ids=seg, position_ids=pos)
    got = model.apply({"params": params}, ids, segment_ids=seg)
    real = np.asarray(seg > 0)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=1e-6, atol=1e-6)


def test_hidden_states_take_segments(rng):
    model = _model("qwen2", False)
    ids, seg, pos, _ = _pack(rng, [[5, 9]], 16)
    params = model.init(jax.random.PRNGKey(1), ids[:, :4])["params"]
    kw = dict(segment_ids=seg, position_ids=pos)
    hidden = model.apply({"params": params}, ids, method="hidden_states", **kw)
    head = model.apply({"params": params}, hidden, method="logits_from_hidden")
    np.testing.assert_allclose(head, model.apply({"params": params}, ids, **kw),
                               rtol=1e-6, atol=1e-6)


def test_segments_with_a_cache_are_refused(rng):
    model = _model("llama", False)
    ids = jnp.ones((1, 4), jnp.int32)
    params = model.init(jax.random.PRNGKey(0), ids)["params"]
    with pytest.raises(ValueError, match="segment_ids"):
        model.apply({"params": params}, ids, segment_ids=ids, cache=model.init_cache(1, 8))


def _qkv(rng, b, t, h, g, k, dtype=jnp.float32):
    return tuple(jnp.asarray(rng.standard_normal((b, t, n, k)), dtype) for n in (h, g, g))


@pytest.mark.slow
def test_fused_kernel_equals_the_xla_mask_forward_and_backward(rng):
    # The Pallas kernel in interpret mode (the code the GPU compiles), GQA 4:2, two tiles of 32
    # in the backward pass, segments crossing tile borders, padding at the end of row 0.
    b, t, h, g, k = 2, 64, 4, 2, 16
    q, kk, v = _qkv(rng, b, t, h, g, k)
    seg = np.zeros((b, t), np.int32)
    seg[0, :21], seg[0, 21:50] = 1, 2
    seg[1, :37], seg[1, 37:] = 1, 2
    seg = jnp.asarray(seg)
    mask = segments.segment_mask(seg)
    dy = jnp.asarray(rng.standard_normal((b, t, h, k)), jnp.float32)
    fused = lambda *a: segments.fused_segment_attention(*a, seg, k ** -0.5,  # noqa: E731
                                                        interpret=True)
    xla = lambda *a: jax.nn.dot_product_attention(*a, mask=mask, scale=k ** -0.5)  # noqa: E731
    real = np.asarray(seg > 0)
    with jax.default_matmul_precision("highest"):
        out_f, vjp_f = jax.vjp(fused, q, kk, v)
        out_x, vjp_x = jax.vjp(xla, q, kk, v)
        dy = jnp.where(jnp.asarray(real)[..., None, None], dy, 0)  # padding rows carry no loss
        grads_f, grads_x = vjp_f(dy), vjp_x(dy)
    assert _rel(np.asarray(out_f)[real], np.asarray(out_x)[real]) < 1e-5
    for a, b_ in zip(grads_f, grads_x):
        assert _rel(a, b_) < 1e-5


def test_segment_mask_and_positions(rng):
    seg = jnp.asarray([[1, 1, 2, 2, 2, 0]])
    m = np.asarray(segments.segment_mask(seg, sliding_window=2))[0, 0]
    want = np.zeros((6, 6), bool)
    for t in range(6):
        for s in range(6):
            want[t, s] = s <= t and t - s < 2 and int(seg[0, s]) == int(seg[0, t])
    np.testing.assert_array_equal(m, want)
    np.testing.assert_array_equal(segments.positions_from_segments(seg), [[0, 1, 0, 1, 2, 0]])
    assert segments.fused_fits(256, 64, None) and segments.fused_fits(64, 128, None)
    assert not segments.fused_fits(256, 64, 4096)
    assert not segments.fused_fits(200, 64, None) and not segments.fused_fits(256, 80, None)
    assert segments.segment_attention_impl("auto", 256, 64, jnp.float32, None) == "xla"
    assert segments.segment_attention_impl("pallas", 256, 64, jnp.float32, None) == "pallas"
    with pytest.raises(ValueError, match="cudnn"):
        segments.segment_attention_impl("cudnn", 256, 64, jnp.bfloat16, None)
    with pytest.raises(ValueError, match="sliding window"):
        segments.segment_attention_impl("pallas", 256, 64, jnp.bfloat16, 16)


@pytest.mark.slow
def test_llama_with_the_fused_kernel_equals_the_xla_path(rng):
    # attention="pallas" on CPU: the model wiring of the fused kernel (interpret mode), GQA 4:2.
    model = _model("qwen2", True)
    ids, seg, pos, _ = _pack(rng, [[9, 14, 6], [20, 7]], 32)
    params = model.init(jax.random.PRNGKey(int(rng.integers(1 << 30))), ids[:1, :4])["params"]
    trainable, frozen = qj.lora.partition(params)
    real = (seg > 0)[..., None]

    def grads(m):
        def loss(t):
            logits = m.apply({"params": qj.lora.combine(t, frozen)}, ids, segment_ids=seg)
            return jnp.sum(jnp.where(real, logits, 0) ** 2), logits
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)

    with jax.default_matmul_precision("highest"):
        (l_f, logits_f), g_f = grads(model.clone(attention="pallas"))
        (l_x, logits_x), g_x = grads(model.clone(attention="xla"))
    assert _rel(np.asarray(logits_f)[np.asarray(seg > 0)],
                np.asarray(logits_x)[np.asarray(seg > 0)]) < 1e-5
    for a, b in zip(jax.tree.leaves(g_f), jax.tree.leaves(g_x)):
        assert _rel(a, b) < 1e-5
