"""QTensor <-> bitsandbytes state dicts, with bitsandbytes (CPU) as the oracle.

- ``from_bnb_state_dict`` on what bitsandbytes writes dequantizes to exactly
  ``bitsandbytes.functional.dequantize_4bit``.
- ``to_bnb_state_dict`` writes the keys, dtypes, shapes and JSON of
  docs/formats.md, and bitsandbytes reads it back to our values bit for bit.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.quant import dequantize, from_bnb_state_dict, quantize, to_bnb_state_dict

DTYPES = ("float32", "bfloat16", "float16")
PREFIX = "model.encoder.layer.0.attention.self.query.weight"
JSON_KEYS = ["quant_type", "blocksize", "dtype", "shape"]
JSON_KEYS_NESTED = JSON_KEYS + ["nested_blocksize", "nested_dtype", "nested_offset"]


def _values(rng, shape):
    n = math.prod(shape)
    x = rng.standard_normal(n) * 10.0 ** rng.uniform(-2, 2, size=n // 50 + 1).repeat(50)[:n]
    return x.reshape(shape).astype(np.float32)


def _bnb_zero_sign_unreliable(qtype, shape, block_size) -> bool:
    """bitsandbytes' CPU dequantize_4bit (0.50.2) decodes FP4 code 8 (zero) to -0.0 when
    the length is even but not a multiple of the block (+0.0 otherwise, as its table)."""
    n = math.prod(shape)
    return qtype == "fp4" and n % 2 == 0 and n % block_size != 0


def _bnb_sd(bnb, xt, qtype, block_size, nested, prefix="weight"):
    packed, state = bnb.quantize(xt, qtype, block_size, nested)
    return bnb.state_dict(packed, state, prefix), packed, state


def _json(sd, prefix, qtype):
    raw = np.asarray(sd[f"{prefix}.quant_state.bitsandbytes__{qtype}"])
    return bytes(raw.astype(np.uint8).tobytes()).decode("utf-8")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("qtype", ["nf4", "fp4"])
def test_dequantize_bnb_state_dict_equals_bnb(bnb, rng, qtype, nested, dtype):
    # (shape, block size, flatten the oracle); the 16-bit dtypes run a subset (compile time).
    cases = [((64, 256), 64, False), ((1000,), 64, True), ((33, 7), 64, True),
             ((48, 384), 128, False), ((2, 3, 128), 128, False)]
    for shape, block_size, flatten in cases if dtype == "float32" else cases[:3]:
        _, xt = bnb.make_input(_values(rng, shape), dtype)
        sd, packed, state = _bnb_sd(bnb, xt, qtype, block_size, nested)
        q = from_bnb_state_dict(sd)  # torch tensors, as bitsandbytes writes them
        assert q.shape == shape and q.qtype == qtype and q.block_size == block_size
        assert q.dtype == jnp.dtype(dtype) and q.double_quant == nested
        # Rows shorter than a block need the flattened oracle (bitsandbytes CPU bug).
        want = bnb.dequantize(packed, state, flatten=flatten)
        zero_sign = _bnb_zero_sign_unreliable(qtype, shape, block_size)
        bnb.assert_bits_equal(np.asarray(dequantize(q, impl="xla")), want,
                              f"dequantized {shape} block {block_size}", zero_sign)
        # Also under jit, where XLA fuses (no fused multiply-add may change the rounding).
        jitted = jax.jit(lambda t: dequantize(t, impl="xla"))(q)
        bnb.assert_bits_equal(np.asarray(jitted), want, f"jit dequantized {shape}", zero_sign)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_reads_numpy_state_dict_and_other_dtypes(bnb, rng, nested):
    _, xt = bnb.make_input(_values(rng, (96, 128)), "bfloat16")
    sd, packed, state = _bnb_sd(bnb, xt, "nf4", 64, nested, prefix=PREFIX)
    sd_np = {k: v.numpy() for k, v in sd.items()}
    q = from_bnb_state_dict(sd_np, prefix=PREFIX)
    want = bnb.dequantize(packed, state)
    bnb.assert_bits_equal(np.asarray(dequantize(q)), want)
    # Asking for another dtype: float32 values are exact, cast once.
    want32 = bnb.dequantize(packed, _with_dtype(bnb, state, "float32"))
    bnb.assert_bits_equal(np.asarray(dequantize(q, jnp.float32)), want32)


def _with_dtype(bnb, state, dtype):
    import copy
    state = copy.copy(state)
    state.dtype = bnb.torch_dtype(dtype)
    return state


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("qtype", ["nf4", "fp4"])
def test_to_bnb_state_dict_layout(bnb, rng, qtype, nested):
    shape = (96, 200)  # n = 19200: 300 blocks of 64, 2 nested blocks
    xj, xt = bnb.make_input(_values(rng, shape), "bfloat16")
    sd = to_bnb_state_dict(quantize(xj, qtype, 64, double_quant=nested), PREFIX)
    n, n_blocks = 96 * 200, 300
    expected = {
        PREFIX: (np.uint8, ((n + 1) // 2, 1)),
        f"{PREFIX}.absmax": (np.uint8 if nested else np.float32, (n_blocks,)),
        f"{PREFIX}.quant_map": (np.float32, (16,)),
    }
    if nested:
        expected[f"{PREFIX}.nested_absmax"] = (np.float32, (2,))
        expected[f"{PREFIX}.nested_quant_map"] = (np.float32, (256,))
    qs_key = f"{PREFIX}.quant_state.bitsandbytes__{qtype}"
    assert set(sd) == set(expected) | {qs_key}
    for key, (dtype, shp) in expected.items():
        assert isinstance(sd[key], np.ndarray), key
        assert sd[key].dtype == dtype and sd[key].shape == shp, (key, sd[key].dtype, sd[key].shape)
    assert sd[qs_key].dtype == np.uint8 and sd[qs_key].ndim == 1
    meta = json.loads(_json(sd, PREFIX, qtype))
    assert list(meta) == (JSON_KEYS_NESTED if nested else JSON_KEYS)
    assert meta["quant_type"] == qtype and meta["blocksize"] == 64
    assert meta["dtype"] == "bfloat16" and meta["shape"] == [96, 200]
    if nested:
        assert meta["nested_blocksize"] == 256 and meta["nested_dtype"] == "float32"

    # Same entries as bitsandbytes' own state dict for the same tensor.
    theirs, _, _ = _bnb_sd(bnb, xt, qtype, 64, nested, prefix=PREFIX)
    assert set(theirs) == set(sd)
    for key in sd:
        t = bnb.to_numpy(theirs[key])
        assert t.dtype == sd[key].dtype, key
        assert key == qs_key or t.shape == sd[key].shape, key  # the JSON's length may differ
    for key in [PREFIX, f"{PREFIX}.quant_map"] + ([f"{PREFIX}.nested_quant_map"] if nested
                                                  else [f"{PREFIX}.absmax"]):
        bnb.assert_bits_equal(sd[key], bnb.to_numpy(theirs[key]), key)
    their_meta = json.loads(_json(theirs, PREFIX, qtype))
    if nested:
        # The mean may differ in summation order: compare within float32 rounding.
        np.testing.assert_allclose(meta.pop("nested_offset"), their_meta.pop("nested_offset"),
                                   rtol=2e-6)
        assert meta == their_meta
    else:
        assert _json(sd, PREFIX, qtype) == _json(theirs, PREFIX, qtype)  # byte-identical JSON


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("qtype", ["nf4", "fp4"])
def test_bnb_reads_our_state_dict(bnb, rng, qtype, nested, dtype):
    torch, F = bnb.torch, bnb.F
    cases = [((64, 256), 64), ((999,), 128), ((5, 31), 32)]
    for shape, block_size in cases if dtype == "float32" else cases[:2]:
        xj, _ = bnb.make_input(_values(rng, shape), dtype)
        q = quantize(xj, qtype, block_size, double_quant=nested)
        sd = {k: torch.from_numpy(v.copy()) for k, v in to_bnb_state_dict(q, PREFIX).items()}
        packed = sd.pop(PREFIX)
        state = F.QuantState.from_dict(sd, device=torch.device("cpu"))
        assert tuple(state.shape) == shape and state.dtype == bnb.torch_dtype(dtype)
        want = np.asarray(dequantize(q, impl="xla"))
        got = bnb.dequantize(packed, state, flatten=True)
        bnb.assert_bits_equal(want, got, f"bnb reading our {shape} block {block_size}",
                              ignore_zero_sign=_bnb_zero_sign_unreliable(qtype, shape, block_size))


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_bnb_linear4bit_loads_our_weight(bnb, rng, nested):
    """bitsandbytes' Linear4bit (the layer transformers builds) loads our entries."""
    torch, F = bnb.torch, bnb.F
    bnn = pytest.importorskip("bitsandbytes.nn")
    xj, _ = bnb.make_input(_values(rng, (128, 256)), "bfloat16")
    q = quantize(xj, "nf4", 64, double_quant=nested)
    sd = {k: torch.from_numpy(v.copy()) for k, v in to_bnb_state_dict(q).items()}
    weight = bnn.Params4bit.from_prequantized(data=sd.pop("weight"), quantized_stats=sd,
                                              requires_grad=False, device="cpu")
    layer = bnn.Linear4bit(256, 128, bias=False, compute_dtype=torch.bfloat16,
                           compress_statistics=nested, quant_type="nf4")
    layer.weight = weight
    layer.train()  # eval mode may repack the weight on AVX512-BF16 CPUs (formats.md)
    w = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    bnb.assert_bits_equal(np.asarray(dequantize(q)), bnb.to_numpy(w), "Linear4bit weight")
    x = torch.from_numpy(rng.standard_normal((3, 256)).astype(np.float32)).bfloat16()
    y = bnb.to_numpy(layer(x).detach()).astype(np.float32)
    ref = np.asarray(x.float().numpy(), np.float64) @ np.asarray(dequantize(q), np.float64).T
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-2 * np.abs(ref).max())


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("qtype", ["nf4", "fp4"])
def test_round_trip_through_safetensors(rng, tmp_path, qtype, nested):
    from safetensors.numpy import load_file, save_file

    x = jnp.asarray(_values(rng, (40, 77))).astype(jnp.float16)
    q = quantize(x, qtype, 128, double_quant=nested)
    path = tmp_path / "model.safetensors"
    save_file(to_bnb_state_dict(q, PREFIX), str(path))
    q2 = from_bnb_state_dict(load_file(str(path)), PREFIX)
    assert (q2.shape, q2.dtype, q2.qtype, q2.block_size, q2.nested_block_size) == (
        q.shape, q.dtype, q.qtype, q.block_size, q.nested_block_size)
    for name, a in q.arrays().items():
        b = q2.arrays()[name]
        assert np.asarray(a).dtype == np.asarray(b).dtype
        np.testing.assert_array_equal(np.asarray(a).reshape(-1), np.asarray(b).reshape(-1))
    np.testing.assert_array_equal(np.asarray(dequantize(q2)).view(np.uint16),
                                  np.asarray(dequantize(q)).view(np.uint16))
