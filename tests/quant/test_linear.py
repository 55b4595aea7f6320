"""linear(x, q, impl="xla") = x @ dequantize(q).T, and its custom VJP (input gradient only)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.quant import dequantize, linear, quantize, resolve_impl

# Relative tolerance by activation dtype (output rounding plus float32 accumulation).
TOL = {"float32": 1e-5, "bfloat16": 1.6e-2, "float16": 2e-3}


def _setup(rng, dtype, lead=(2, 3), out_f=48, in_f=128, qtype="nf4", double_quant=True):
    w = rng.standard_normal((out_f, in_f), dtype=np.float32) * 0.05
    q = quantize(jnp.asarray(w).astype(jnp.bfloat16), qtype, 64, double_quant=double_quant)
    x = jnp.asarray(rng.standard_normal(lead + (in_f,), dtype=np.float32)).astype(dtype)
    w_deq = np.asarray(dequantize(q, dtype).astype(jnp.float32), np.float64)  # W in x.dtype
    return x, q, w_deq


def _close(actual, reference, dtype, what):
    actual = np.asarray(jnp.asarray(actual).astype(jnp.float32), np.float64)
    scale = np.abs(reference).max()
    np.testing.assert_allclose(actual, reference, rtol=TOL[dtype], atol=TOL[dtype] * scale,
                               err_msg=what)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("qtype", ["nf4", "fp4", "int4"])
def test_linear_equals_dequantized_matmul(rng, qtype, dtype):
    x, q, w = _setup(rng, dtype, qtype=qtype)
    y = linear(x, q, impl="xla")
    assert y.shape == (2, 3, 48) and y.dtype == jnp.dtype(dtype)
    ref = np.asarray(x.astype(jnp.float32), np.float64) @ w.T
    _close(y, ref, dtype, "forward")
    # jit gives the same result; "auto" is the xla path on CPU.
    y_jit = jax.jit(lambda a, b: linear(a, b, impl="xla"))(x, q)
    _close(y_jit, ref, dtype, "forward under jit")
    if jax.default_backend() == "cpu":
        assert resolve_impl("auto") == "xla"
        np.testing.assert_array_equal(np.asarray(linear(x, q, impl="auto")), np.asarray(y))


@pytest.mark.parametrize("lead", [(), (7,), (2, 3, 4)])
def test_leading_batch_dims(rng, lead):
    x, q, w = _setup(rng, "float32", lead=lead, out_f=24, in_f=64, double_quant=False)
    y = linear(x, q, impl="xla")
    assert y.shape == lead + (24,)
    _close(y, np.asarray(x, np.float64) @ w.T, "float32", f"lead {lead}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "nested"])
def test_grad_wrt_x_is_dy_times_w(rng, dtype, double_quant):
    x, q, w = _setup(rng, dtype, double_quant=double_quant)
    dy = jnp.asarray(rng.standard_normal((2, 3, 48), dtype=np.float32)).astype(dtype)

    def loss(a, b):
        return jnp.sum(linear(a, b, impl="xla").astype(jnp.float32) * dy.astype(jnp.float32))

    ref = np.asarray(dy.astype(jnp.float32), np.float64) @ w  # dy @ W: [2, 3, in]
    gx = jax.grad(loss)(x, q)
    assert gx.shape == x.shape and gx.dtype == x.dtype
    _close(gx, ref, dtype, "grad x")
    _close(jax.jit(jax.grad(loss))(x, q), ref, dtype, "grad x under jit")

    # The weight gets a zero cotangent: float0 for the uint8 arrays, zeros for float ones.
    y, vjp = jax.vjp(lambda a, b: linear(a, b, impl="xla"), x, q)
    gx2, gq = vjp(dy)
    _close(gx2, ref, dtype, "vjp x")
    assert type(gq) is type(q) and gq.shape == q.shape
    leaves = jax.tree.leaves(gq)
    assert len(leaves) == len(jax.tree.leaves(q))
    for leaf, orig in zip(leaves, jax.tree.leaves(q)):
        if jnp.issubdtype(orig.dtype, jnp.integer):
            assert leaf.dtype == jax.dtypes.float0
        else:
            assert not np.any(np.asarray(leaf)), "the frozen weight must get a zero cotangent"
    # grad wrt the QTensor itself (allow_int for the uint8 leaves) is zero as well.
    gq2 = jax.grad(loss, argnums=1, allow_int=True)(x, q)
    for leaf in jax.tree.leaves(gq2):
        assert leaf.dtype == jax.dtypes.float0 or not np.any(np.asarray(leaf))


def test_weight_is_not_differentiated_through_dequantize(rng):
    """Without the custom VJP autodiff would give the float32 absmax a non-zero gradient."""
    x, q, _ = _setup(rng, "float32", double_quant=False)
    assert q.absmax.dtype == jnp.float32
    g = jax.grad(lambda b: jnp.sum(linear(x, b, impl="xla") ** 2), allow_int=True)(q)
    assert not np.any(np.asarray(g.absmax))
    # Sanity: the same loss through a plain dequantize does reach absmax.
    g_plain = jax.grad(lambda b: jnp.sum((x @ dequantize(b, jnp.float32).T) ** 2),
                       allow_int=True)(q)
    assert np.any(np.asarray(g_plain.absmax))


def test_mixed_dtypes(rng):
    # A weight quantized from bfloat16, used with float16 and float32 activations.
    x, q, w = _setup(rng, "float16", lead=(5,))
    y = linear(x, q, impl="xla")
    assert y.dtype == jnp.float16
    _close(y, np.asarray(x.astype(jnp.float32), np.float64) @ w.T, "float16", "float16 x")
    x32 = x.astype(jnp.float32)
    w32 = np.asarray(dequantize(q, jnp.float32), np.float64)
    _close(linear(x32, q, impl="xla"), np.asarray(x32, np.float64) @ w32.T, "float32", "f32 x")
