"""One GEMV launch for several 4-bit weights (q/k/v, gate/up at decode) equals separate calls."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlora_jax as qj
from qlora_jax.quant.blockwise import dequantize_xla
from qlora_jax.quant.kernels import gpu
from qlora_jax.quant.kernels.multi import fusable, gemv_4bit_multi
from qlora_jax.quant.layer_view import LayerView

SMALL = gpu.MatmulConfig(bm=None, bn=16, bk=64, split=2)


def _q(rng, shape, double_quant, block_size=64):
    w = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.1, 3.0)
    return qj.quant.quantize(w, "nf4", block_size, double_quant)


@pytest.mark.parametrize("double_quant", [True, False])
def test_fused_qkv_equals_separate_gemvs(rng, double_quant):
    # q wider than k/v (GQA); v's 40 rows are not a whole tile: the masked path.
    ws = [_q(rng, (96, 256), double_quant), _q(rng, (48, 256), double_quant),
          _q(rng, (40, 256), double_quant, block_size=128)]
    x = jnp.asarray(rng.standard_normal((1, 256)), jnp.float32)
    got = gemv_4bit_multi(x, ws, SMALL)
    for g, q in zip(got, ws):
        want = gpu.matmul_4bit(x, q, transpose=False, config=SMALL)
        assert g.shape == want.shape == (1, q.logical_shape[0])
        np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-6, atol=1e-6)
        ref = np.asarray(x, np.float64) @ np.asarray(dequantize_xla(q, jnp.float32), np.float64).T
        np.testing.assert_allclose(np.asarray(g), ref, rtol=1e-4, atol=1e-4)


def test_fused_layer_views_read_their_layer_in_place(rng):
    layers = 3
    stacks = []
    for rows in (64, 32):
        qs = [_q(rng, (rows, 128), True) for _ in range(layers)]
        stacks.append((qs, jax.tree.map(lambda *a: jnp.stack(a), *qs)))
    x = jnp.asarray(rng.standard_normal((1, 128)), jnp.bfloat16)
    fn = jax.jit(lambda x, s0, s1, i: gemv_4bit_multi(
        x, [LayerView(s0, i), LayerView(s1, i)], SMALL))
    for i in range(layers):
        got = fn(x, stacks[0][1], stacks[1][1], jnp.int32(i))
        for g, (qs, _) in zip(got, stacks):
            want = gpu.matmul_4bit(x, qs[i], transpose=False, config=SMALL)
            assert g.dtype == jnp.bfloat16
            np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(want, np.float32))


def test_refuses_what_it_cannot_fuse(rng):
    a, b = _q(rng, (32, 128), True), _q(rng, (32, 256), True)
    assert not fusable([a]) and not fusable([a, b]) and fusable([a, a])
    with pytest.raises(ValueError, match="one input width"):
        gemv_4bit_multi(jnp.ones((1, 128)), [a, b])
    with pytest.raises(ValueError, match="one row"):
        gemv_4bit_multi(jnp.ones((2, 128)), [a, a])
