"""QTensor as a pytree (jit, vmap, tree.map, scan) and the error bounds of each data type."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.quant import INT4, NF4, FP4, QTensor, dequantize, is_qtensor, linear, quantize
from qlora_jax.quant.blockwise import dequantize_absmax


def _bits(a):
    a = np.asarray(a)
    return a.view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def _stack(qs):
    return jax.tree.map(lambda *a: jnp.stack(a), *qs)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "nested"])
def test_tree_structure_and_jit(rng, double_quant):
    x = jnp.asarray(rng.standard_normal((48, 80), dtype=np.float32)).astype(jnp.bfloat16)
    q = quantize(x, "nf4", 64, double_quant=double_quant)
    leaves = jax.tree.leaves(q)
    assert len(leaves) == (4 if double_quant else 2)
    assert leaves[0].dtype == jnp.uint8 and leaves[0].shape == (48 * 80 // 2,)
    q2 = jax.tree.map(lambda a: a + 0 if a.dtype == jnp.uint8 else a * 1, q)
    assert isinstance(q2, QTensor) and is_qtensor(q2)
    assert (q2.shape, q2.dtype, q2.qtype, q2.block_size, q2.nested_block_size) == (
        (48, 80), jnp.bfloat16, "nf4", 64, 256 if double_quant else None)
    same = jax.jit(lambda t: t)(q)
    assert isinstance(same, QTensor) and same.shape == q.shape and same.dtype == q.dtype
    eager = np.asarray(dequantize(q))
    np.testing.assert_array_equal(_bits(jax.jit(dequantize)(q)), _bits(eager))
    np.testing.assert_array_equal(_bits(jax.jit(lambda t: dequantize(t, jnp.float32))(q)),
                                  _bits(np.asarray(dequantize(q, jnp.float32))))
    # Quantizing inside jit gives the same arrays.
    qj = jax.jit(lambda v: quantize(v, "nf4", 64, double_quant=double_quant))(x)
    for a, b in zip(jax.tree.leaves(qj), leaves):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("qtype", ["nf4", "fp4", "int4"])
def test_stacked_qtensor(rng, qtype):
    xs = rng.standard_normal((3, 40, 72), dtype=np.float32)
    qs = [quantize(jnp.asarray(x), qtype, 64) for x in xs]
    stacked = _stack(qs)
    assert stacked.shape == (3, 40, 72) and stacked.stack_shape == (3,)
    assert stacked.logical_shape == (40, 72) and stacked.ndim == 3
    assert stacked.nbytes == 3 * qs[0].nbytes
    per_slice = np.stack([np.asarray(dequantize(q)) for q in qs])
    np.testing.assert_array_equal(np.asarray(dequantize(stacked)), per_slice)
    np.testing.assert_array_equal(np.asarray(jax.vmap(dequantize)(stacked)), per_slice)
    # vmap of quantize over a stacked float array builds the same stacked QTensor.
    vq = jax.vmap(lambda x: quantize(x, qtype, 64))(jnp.asarray(xs))
    assert vq.shape == (3, 40, 72)
    for a, b in zip(jax.tree.leaves(vq), jax.tree.leaves(stacked)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Two stacking axes, and a scan over layers (as nn.scan does).
    two = _stack([stacked, stacked])
    assert two.shape == (2, 3, 40, 72)
    np.testing.assert_array_equal(np.asarray(dequantize(two)), np.stack([per_slice] * 2))
    _, sums = jax.lax.scan(lambda c, q: (c, dequantize(q).sum()), 0.0, stacked)
    np.testing.assert_allclose(np.asarray(sums), per_slice.sum(axis=(1, 2)), rtol=0,
                               atol=1e-6 * np.abs(per_slice).sum())


def test_vmap_linear_over_stacked_weights(rng):
    ws = rng.standard_normal((4, 24, 64), dtype=np.float32)
    qs = [quantize(jnp.asarray(w), "nf4", 64) for w in ws]
    x = jnp.asarray(rng.standard_normal((4, 5, 64), dtype=np.float32))
    got = jax.vmap(lambda q, v: linear(v, q, impl="xla"))(_stack(qs), x)
    want = np.stack([np.asarray(linear(x[i], qs[i], impl="xla")) for i in range(4)])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)


def _per_element_absmax(q, n):
    return np.repeat(np.asarray(dequantize_absmax(q)), q.block_size)[:n]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int4_levels_and_error_bound(rng, dtype):
    x = (rng.standard_normal((64, 130)) * 10.0 ** rng.uniform(-2, 2, (64, 1))).astype(np.float32)
    xj = jnp.asarray(x).astype(dtype)
    x = np.asarray(xj.astype(jnp.float32), np.float64).reshape(-1)
    q = quantize(xj, "int4", 64, double_quant=False)
    packed = np.asarray(q.packed)
    codes = np.stack([packed >> 4, packed & 15], -1).reshape(-1)[:x.size]
    assert codes.max() <= 14, "code 15 is unused"
    absmax = _per_element_absmax(q, x.size).astype(np.float64)
    # Symmetric levels k/7, k = -7..7: the error is at most half a step (absmax / 14).
    deq = np.asarray(dequantize(q, jnp.float32), np.float64).reshape(-1)
    np.testing.assert_allclose(deq, INT4[codes].astype(np.float64) * absmax, rtol=1e-6)
    assert np.all(np.abs(x - deq) <= absmax / 14 * (1 + 1e-5) + 1e-30)
    # Each block's absmax element comes back exactly, with its sign.
    blocks = np.concatenate([x, np.zeros(-x.size % 64)]).reshape(-1, 64)
    idx = np.argmax(np.abs(blocks), axis=1) + 64 * np.arange(blocks.shape[0])
    np.testing.assert_array_equal(deq[idx], x[idx])
    # k/7 is the nearest level: no other level is closer.
    levels = INT4[:15].astype(np.float64)
    dist = np.abs(x[:, None] / absmax[:, None] - levels[None, :])
    assert np.all(dist[np.arange(x.size), codes] <= dist.min(axis=1) + 1e-6)


@pytest.mark.parametrize("qtype,table", [("nf4", NF4), ("fp4", FP4)])
def test_4bit_error_bound(rng, qtype, table):
    x = rng.standard_normal(64 * 200 + 13).astype(np.float32) * 3.0
    q = quantize(jnp.asarray(x), qtype, 64, double_quant=False)
    absmax = _per_element_absmax(q, x.size).astype(np.float64)
    deq = np.asarray(dequantize(q), np.float64)
    values = np.sort(table.astype(np.float64))
    half_gap = np.max(np.diff(values)) / 2
    assert np.all(np.abs(x - deq) <= absmax * half_gap * (1 + 1e-6))
    rel = np.linalg.norm(x - deq) / np.linalg.norm(x)
    assert 0.01 < rel < 0.2, rel  # 4 bits: a few percent, and never lossless
