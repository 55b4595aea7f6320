"""The adapter's B product inside the decoding GEMV (``quant.ops.linear(low_rank=)`` and
LoraDense at one token row): the same values and gradients as the separate dots, and one dot
fewer in the program. Pallas kernels in interpret mode (CPU)."""

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

import qlora_jax as qj
from qlora_jax.lora import LoraDense
from qlora_jax.lora.config import LoraSpec
from qlora_jax.quant import ops as qops
from qlora_jax.quant.blockwise import dequantize_xla
from qlora_jax.quant.config import QuantConfig
from qlora_jax.quant.layer_view import LayerView
from tests.conftest import run_seed

N_OUT, N_IN, R = 48, 256, 8


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _dots(fn, *args) -> int:
    """dot_general equations of ``fn``'s program outside Pallas kernels (sub-jaxprs included)."""
    def count(jaxpr):
        n = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                continue
            n += eqn.primitive.name == "dot_general"
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                n += count(sub)
        return n
    return count(jax.make_jaxpr(fn)(*args).jaxpr)


def _weights(rng):
    w = rng.standard_normal((3, N_OUT, N_IN)).astype(np.float32)
    qs = [qj.quant.quantize(w[i], "nf4", 64, True) for i in range(3)]
    return qs, jax.tree.map(lambda *a: jnp.stack(a), *qs)


@pytest.mark.parametrize("view", [False, True])
def test_linear_low_rank_values_gradients_and_dots(view):
    rng = np.random.default_rng(run_seed())
    qs, stacked = _weights(rng)
    q = LayerView(stacked, jnp.int32(1)) if view else qs[1]
    w = np.asarray(dequantize_xla(qs[1], jnp.float32), np.float64)
    b = jnp.asarray(rng.standard_normal((R, N_OUT)) * 0.3, jnp.float32)
    for rows in (1, 3):  # one row: inside the GEMV; three: the XLA fallback
        x = jnp.asarray(rng.standard_normal((rows, 1, N_IN)), jnp.float32)
        low = jnp.asarray(rng.standard_normal((rows, 1, R)), jnp.float32)
        assert qops.fuses_low_rank(x.reshape(rows, N_IN), q, R, "pallas") == (rows == 1)

        def f(x, low, b):
            return qops.linear(x, q, impl="pallas", low_rank=(low, b))

        y, vjp = jax.vjp(f, x, low, b)
        x64, low64, b64 = (np.asarray(v, np.float64) for v in (x, low, b))
        assert y.shape == (rows, 1, N_OUT)
        assert _rel(y, x64 @ w.T + low64 @ b64) < 1e-5, f"rows={rows} seed={run_seed()}"
        dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
        dx, dlow, db = vjp(dy)
        dy64 = np.asarray(dy, np.float64)
        assert _rel(dx, dy64 @ w) < 1e-5
        assert _rel(dlow, dy64 @ b64.T) < 1e-5
        assert _rel(db, np.einsum("btr,bto->ro", low64, dy64)) < 1e-5
        # the fused path has no dot of its own for low @ b (the kernel adds it)
        assert _dots(f, x, low, b) == (0 if rows == 1 else 1)
    with pytest.raises(ValueError, match="low_rank"):
        qops.linear(x, q, impl="pallas", low_rank=(low, b[:, :5]))


def test_the_fusion_can_be_switched_off_for_measurements(monkeypatch):
    rng = np.random.default_rng(run_seed())
    q = _weights(rng)[0][0]
    x = jnp.ones((1, N_IN), jnp.float32)
    assert qops.fuses_low_rank(x, q, R, "pallas")
    assert not qops.fuses_low_rank(x, q, 6, "pallas")  # rank not a power of two
    assert not qops.fuses_low_rank(x, q, R, "xla")
    monkeypatch.setenv(qops.FUSE_LOW_RANK_ENV, "0")
    assert not qops.fuses_low_rank(x, q, R, "pallas")


def _dense(impl, dropout=0.0):
    spec = LoraSpec(r=R, alpha=16.0, scaling=2.0, dropout=dropout, init="random")
    return LoraDense(N_OUT, lora=spec, quant=QuantConfig(), impl=impl)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lora_dense_adds_the_adapter_inside_the_gemv_at_one_token(dtype):
    rng = np.random.default_rng(run_seed())
    x1 = jnp.asarray(rng.standard_normal((1, 1, N_IN)), dtype)
    params = _dense("pallas").init(jax.random.PRNGKey(run_seed()), x1)
    p = params["params"]
    w = np.asarray(dequantize_xla(p["kernel"], jnp.float32), np.float64)
    a64, b64 = np.asarray(p["lora_a"], np.float64), np.asarray(p["lora_b"], np.float64)
    assert np.abs(b64).max() > 0  # a non-zero B, so the branch is seen
    x64 = np.asarray(x1, np.float64)
    want = x64 @ w.T + 2.0 * (x64 @ a64) @ b64
    fused = _dense("pallas").apply(params, x1)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    assert fused.dtype == dtype and _rel(fused, want) < tol, f"seed={run_seed()}"
    # the unfused path (XLA), the same function
    assert _rel(fused, _dense("xla").apply(params, x1)) < tol
    # one dot (x A) at one token; two (x A, then B) where the branch is not fused: 2 rows, or
    # dropout active
    assert _dots(lambda v: _dense("pallas").apply(params, v), x1) == 1
    x2 = jnp.concatenate([x1, x1], axis=1)
    assert _dots(lambda v: _dense("pallas").apply(params, v), x2) == 2
    drop = _dense("pallas", dropout=0.1)
    assert _dots(lambda v: drop.apply(params, v, deterministic=False,
                                      rngs={"dropout": jax.random.PRNGKey(0)}), x1) == 2
    if dtype != jnp.float32:
        return
    # gradients of the adapter through the fused kernel equal the unfused ones

    def loss(lora, impl):
        full = {"params": {**p, **lora}}
        return jnp.sum(_dense(impl).apply(full, x1) * jnp.arange(N_OUT, dtype=dtype))

    lora = {"lora_a": p["lora_a"], "lora_b": p["lora_b"]}
    got, ref = jax.grad(loss)(lora, "pallas"), jax.grad(loss)(lora, "xla")
    for k in lora:
        assert _rel(got[k], ref[k]) < 1e-5, (k, f"seed={run_seed()}")
