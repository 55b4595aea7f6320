"""Stacked 4-bit kernels read in place: LayerView, the layer kernel, and the Llama layer loop.

The GPU kernels run in Pallas interpret mode here (``impl="pallas"`` on CPU); the kernel code is
the one the GPU compiles. References: ``dequantize_xla`` of the sliced layer (bit for bit) and
the ``nn.scan`` layer loop of the same model (``in_place=False``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlora_jax as qj
from qlora_jax import sharding
from qlora_jax.models.llama import LlamaConfig, LlamaForCausalLM
from qlora_jax.quant import ops, partition
from qlora_jax.quant.blockwise import dequantize_xla, quantize
from qlora_jax.quant.kernels import gpu
from qlora_jax.quant.layer_view import LayerView


def _stack(rng, shape, layers, double_quant, scale=1.0):
    qs = [quantize(jnp.asarray(rng.standard_normal(shape).astype(np.float32) * scale), "nf4",
                   64, double_quant, 256 if double_quant else None) for _ in range(layers)]
    return qs, jax.tree.map(lambda *a: jnp.stack(a), *qs)


# Shapes: several nested absmax blocks (512 x 128 = 1024 blocks of 64), a partial last tile
# (40 x 70: 2800 elements, 44 blocks), and one tile exactly.
@pytest.mark.parametrize("shape", [(512, 128), (40, 70), (64, 256)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_layer_kernel_equals_the_sliced_layer_bit_for_bit(rng, shape, double_quant):
    layers = int(rng.integers(2, 5))
    qs, stacked = _stack(rng, shape, layers, double_quant, scale=float(rng.uniform(0.1, 3)))
    for i in range(layers):
        for dtype in (jnp.bfloat16, jnp.float32):
            got = gpu.dequantize_layer(LayerView(stacked, jnp.int32(i)), dtype)
            want = dequantize_xla(qs[i], dtype)
            assert got.shape == shape and got.dtype == dtype
            assert np.array_equal(np.asarray(got.astype(jnp.float32)),
                                  np.asarray(want.astype(jnp.float32))), (i, dtype)


def test_layer_index_may_be_traced(rng):
    qs, stacked = _stack(rng, (128, 128), 3, True)
    fn = jax.jit(lambda s, i: gpu.dequantize_layer(LayerView(s, i), jnp.bfloat16))
    i = int(rng.integers(3))
    assert np.array_equal(np.asarray(fn(stacked, jnp.int32(i)), np.float32),
                          np.asarray(dequantize_xla(qs[i], jnp.bfloat16), np.float32))


def test_view_needs_a_stack_of_one_layer_axis(rng):
    qs, stacked = _stack(rng, (64, 64), 2, True)
    with pytest.raises(ValueError, match="stacked along one layer axis"):
        LayerView(qs[0], 0)
    big = jax.tree.map(lambda a: jax.ShapeDtypeStruct((1 << 31,) + a.shape[1:], a.dtype), stacked)
    assert LayerView(stacked, 0).fits_int32() and not LayerView(big, 0).fits_int32()


def test_linear_on_a_view_equals_linear_on_the_layer(rng):
    qs, stacked = _stack(rng, (96, 128), 3, True)
    i = int(rng.integers(3))
    x = jnp.asarray(rng.standard_normal((2, 20, 128)), jnp.float32)   # 40 rows: in place
    view = LayerView(stacked, jnp.int32(i))
    x2 = x.reshape(-1, 128)
    # Every row count reads in place: more than 16 rows through the layer dequantization,
    # up to 16 (decoding) through the fused GEMV / small-M kernels on the stacked codes.
    assert ops._in_place(x2, view, "pallas") and ops._in_place(x2[:8], view, "pallas")
    for impl in ("pallas", "xla"):
        np.testing.assert_allclose(ops.linear(x, view, impl=impl), ops.linear(x, qs[i], impl=impl),
                                   rtol=1e-6, atol=1e-6)
        dy = jnp.asarray(rng.standard_normal((2, 20, 96)), jnp.float32)
        g_view = jax.grad(lambda a: jnp.vdot(ops.linear(a, view, impl=impl), dy))(x)
        g_q = jax.grad(lambda a: jnp.vdot(ops.linear(a, qs[i], impl=impl), dy))(x)
        np.testing.assert_allclose(g_view, g_q, rtol=1e-6, atol=1e-6)
    for rows in (1, 8):  # the fused kernels read the layer in place: the same numbers exactly
        small = x.reshape(-1, 128)[:rows]
        assert np.array_equal(np.asarray(ops.linear(small, view, impl="pallas")),
                              np.asarray(ops.linear(small, qs[i], impl="pallas")))


# Decoding shapes: 1 row (GEMV) and 8 rows (the small-M tensor-core kernel), both directions;
# 40 output rows leave a partial tile, 3 x 64 columns a partial reduction tile.
@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("double_quant", [True, False])
def test_fused_layer_kernels_equal_the_sliced_layer(rng, rows, transpose, double_quant):
    shape = (40, 192) if rows == 1 else (96, 256)
    layers = 3
    qs, stacked = _stack(rng, shape, layers, double_quant, scale=float(rng.uniform(0.5, 2)))
    width = shape[0] if transpose else shape[1]
    for i in (1, layers - 1):  # offsets past layer 0 (layer 0 is the unstacked case)
        view = LayerView(stacked, jnp.int32(i))
        for dtype in (jnp.float32, jnp.bfloat16) if rows == 1 else (jnp.float32,):
            a = jnp.asarray(rng.standard_normal((rows, width)), dtype)
            if transpose:
                got = gpu.linear_grad_input_layer(a, view)
                want = gpu.linear_grad_input(a, qs[i])
            else:
                got = gpu.linear_layer(a, view)
                want = gpu.linear(a, qs[i])
            assert got.dtype == dtype and got.shape == want.shape
            assert np.array_equal(np.asarray(got.astype(jnp.float32)),
                                  np.asarray(want.astype(jnp.float32))), (i, dtype)
            ref = (np.asarray(a, np.float64) @ np.asarray(dequantize_xla(qs[i], jnp.float32),
                                                          np.float64).T) if not transpose else (
                np.asarray(a, np.float64) @ np.asarray(dequantize_xla(qs[i], jnp.float32),
                                                       np.float64))
            tol = 1e-5 if dtype == jnp.float32 else 2e-2
            err = np.linalg.norm(np.asarray(got, np.float64) - ref) / np.linalg.norm(ref)
            assert err < tol, (i, dtype, err)


def test_fused_layer_kernel_reads_a_traced_layer_under_jit(rng):
    qs, stacked = _stack(rng, (64, 128), 4, True)
    x = jnp.asarray(rng.standard_normal((1, 128)), jnp.float32)
    fn = jax.jit(lambda s, i, v: gpu.linear_layer(v, LayerView(s, i)))
    for i in (0, 3):
        assert np.array_equal(np.asarray(fn(stacked, jnp.int32(i), x)),
                              np.asarray(gpu.linear(x, qs[i])))


def test_codes_split_over_a_mesh_are_not_read_in_place(rng):
    _, stacked = _stack(rng, (64, 128), 2, True)
    mesh = jax.sharding.AbstractMesh((1, 2, 1), ("data", "fsdp", "tensor"))
    assert not partition.splits_4bit_codes(stacked)
    with jax.sharding.use_abstract_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        assert partition.splits_4bit_codes(stacked)
    data_parallel = jax.sharding.AbstractMesh((2, 1, 1), ("data", "fsdp", "tensor"))
    with jax.sharding.use_abstract_mesh(data_parallel), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        assert not partition.splits_4bit_codes(stacked)


def _model(rng, remat):
    cfg = LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=192, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    model = LlamaForCausalLM(cfg, quant=qj.QuantConfig(), impl="pallas", remat=remat,
                             lora=qj.LoraConfig(r=4, target_modules="all-linear", init="random"))
    # 65 tokens: more than gpu.FUSED_MAX_TOKENS, so each layer is dequantized in place
    ids = jnp.asarray(rng.integers(0, 96, (1, 65)))
    params = model.init(jax.random.PRNGKey(int(rng.integers(1 << 30))), ids)["params"]
    return model, params, ids


@pytest.mark.parametrize("remat", ["none", "full", "qkv"])
def test_llama_in_place_loop_equals_the_scan(rng, remat, monkeypatch):
    model, params, ids = _model(rng, remat)
    calls = []
    real = gpu.dequantize_layer
    monkeypatch.setattr(gpu, "dequantize_layer", lambda *a, **k: calls.append(1) or real(*a, **k))
    trainable, frozen = qj.lora.partition(params)

    def run(m):
        def loss(t):
            logits = m.apply({"params": qj.lora.combine(t, frozen)}, ids)
            return jnp.mean(logits.astype(jnp.float32) ** 2), logits
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)

    (l1, logits1), g1 = run(model)
    assert calls, "the in-place loop did not run"
    n = len(calls)
    (l0, logits0), g0 = run(model.clone(in_place=False))
    assert len(calls) == n, "in_place=False still read a layer in place"
    assert float(jnp.std(logits0)) > 0.1
    np.testing.assert_allclose(logits1, logits0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    leaves0, leaves1 = jax.tree.leaves(g0), jax.tree.leaves(g1)
    assert len(leaves0) == len(leaves1) > 0
    for a, b in zip(leaves0, leaves1):
        scale = float(jnp.max(jnp.abs(a))) + 1e-12
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * scale)


def test_llama_in_place_dropout_is_random_and_deterministic_when_off(rng):
    cfg = LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    model = LlamaForCausalLM(cfg, quant=qj.QuantConfig(), impl="pallas",
                             lora=qj.LoraConfig(r=4, target_modules="all-linear", init="random",
                                                dropout=0.5))
    ids = jnp.asarray(rng.integers(0, 96, (2, 12)))
    params = model.init(jax.random.PRNGKey(0), ids)["params"]
    off = model.apply({"params": params}, ids)
    np.testing.assert_allclose(off, model.clone(in_place=False).apply({"params": params}, ids),
                               rtol=1e-5, atol=1e-5)
    k1, k2 = jax.random.split(jax.random.PRNGKey(int(rng.integers(1 << 30))))
    d1 = model.apply({"params": params}, ids, deterministic=False, rngs={"dropout": k1})
    d2 = model.apply({"params": params}, ids, deterministic=False, rngs={"dropout": k2})
    assert float(jnp.max(jnp.abs(d1 - off))) > 1e-3 and float(jnp.max(jnp.abs(d1 - d2))) > 1e-3


def test_llama_stacks_too_large_for_int32_are_sliced_and_the_rest_read_in_place(rng, monkeypatch):
    # llama-70b: the q/o/MLP stacks exceed 2**31 bytes and are sliced; k/v are read in place.
    # Here a limit between the tiny model's k/v and q/MLP stack sizes gives the same mix.
    from qlora_jax.quant import layer_view
    model, params, ids = _model(rng, "full")
    want = model.clone(in_place=False).apply({"params": params}, ids)
    monkeypatch.setattr(layer_view, "MAX_IN_PLACE_ELEMENTS", 3 * 128 * 64 // 2)
    views = []
    real = gpu.dequantize_layer
    monkeypatch.setattr(gpu, "dequantize_layer",
                        lambda v, *a, **k: views.append(v.shape) or real(v, *a, **k))
    got = model.apply({"params": params}, ids)
    assert sorted(set(views)) == [(64, 128)], views   # k_proj and v_proj only
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
