"""Bad input to qj.quant raises an error whose message names the problem."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

import qlora_jax as qj
from qlora_jax.quant import (dequantize, from_bnb_state_dict, linear, quantize,
                             to_bnb_state_dict)

P = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture
def weight(rng) -> jnp.ndarray:
    return jnp.asarray(rng.standard_normal((32, 128), dtype=np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_nan_or_inf(rng, bad, dtype):
    x = rng.standard_normal((16, 64)).astype(np.float32)
    x[int(rng.integers(16)), int(rng.integers(64))] = bad
    with pytest.raises(ValueError, match=r"shape \(16, 64\) holding 1 NaN or Inf"):
        quantize(jnp.asarray(x).astype(dtype))


@pytest.mark.parametrize("block_size", [48, 8192, 16, 0, -64])
def test_block_size_not_allowed(weight, block_size):
    with pytest.raises(ValueError, match=rf"block_size={block_size} is not allowed.*\(32, 64"):
        quantize(weight, block_size=block_size)
    with pytest.raises(ValueError, match=rf"block_size={block_size} is not allowed"):
        qj.QuantConfig(block_size=block_size)


def test_nested_block_size_not_allowed(weight):
    with pytest.raises(ValueError, match="nested_block_size=128 is not allowed"):
        quantize(weight, nested_block_size=128)
    quantize(weight, nested_block_size=128, double_quant=False)  # unused without nesting


def test_unknown_qtype(weight):
    with pytest.raises(ValueError, match=r"unknown qtype 'nf3'.*'nf4', 'fp4', 'int4'"):
        quantize(weight, "nf3")
    with pytest.raises(ValueError, match="unknown qtype 'NF4'"):
        qj.QuantConfig(qtype="NF4")


@pytest.mark.parametrize("shape", [(0,), (0, 64), (64, 0)])
def test_empty_array(shape):
    with pytest.raises(ValueError, match=r"empty array of shape \(" + str(shape[0])):
        quantize(jnp.zeros(shape, jnp.float32))


@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.bool_, np.complex64])
def test_not_a_supported_float(dtype):
    x = np.ones((4, 64), dtype)
    with pytest.raises(ValueError, match="expects a float32, bfloat16 or float16 array, got"):
        quantize(x)


def test_float64_numpy_is_taken_as_float32(rng):
    # With jax_enable_x64 off (the default) JAX canonicalises float64 to float32.
    x = rng.standard_normal((4, 64))
    q = quantize(x)
    assert q.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(q.packed),
                                  np.asarray(quantize(x.astype(np.float32)).packed))


# -- bitsandbytes state dicts --------------------------------------------------------------

def _sd(weight, nested=True, qtype="nf4"):
    return to_bnb_state_dict(quantize(weight, qtype, 64, double_quant=nested), P)


def _with_meta(sd, qtype="nf4", **changes):
    key = f"{P}.quant_state.bitsandbytes__{qtype}"
    meta = json.loads(bytes(sd[key]).decode())
    for k, v in changes.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    sd = dict(sd)
    sd[key] = np.frombuffer(json.dumps(meta).encode(), np.uint8).copy()
    return sd


@pytest.mark.parametrize("suffix,nested", [
    (".absmax", True), (".absmax", False), (".quant_map", True), (".quant_map", False),
    (".nested_absmax", True), (".nested_quant_map", True), ("", True)])
def test_missing_key(weight, suffix, nested):
    sd = _sd(weight, nested)
    del sd[P + suffix]
    with pytest.raises(KeyError, match=f"missing the entry '{P}{suffix}'"):
        from_bnb_state_dict(sd, P)


def test_missing_quant_state(weight):
    sd = _sd(weight)
    del sd[f"{P}.quant_state.bitsandbytes__nf4"]
    with pytest.raises(KeyError, match=f"no bitsandbytes quant state for '{P}'"):
        from_bnb_state_dict(sd, P)
    with pytest.raises(KeyError, match="no bitsandbytes quant state for 'other.weight'"):
        from_bnb_state_dict(_sd(weight), "other.weight")


@pytest.mark.parametrize("suffix,bad_shape", [
    ("", (32 * 128 // 2 - 1, 1)), ("", (1, 32 * 128 // 2)), (".absmax", (65,)),
    (".quant_map", (15,)), (".nested_absmax", (2,)), (".nested_quant_map", (255,))])
def test_wrong_shape(weight, suffix, bad_shape):
    sd = _sd(weight)
    sd[P + suffix] = np.zeros(bad_shape, sd[P + suffix].dtype)
    with pytest.raises(ValueError, match=rf"{P}{suffix}: expected shape .* found \({bad_shape[0]}"):
        from_bnb_state_dict(sd, P)


def test_shape_in_metadata_disagrees(weight):
    sd = _with_meta(_sd(weight, nested=False), shape=[64, 128])
    with pytest.raises(ValueError, match=rf"{P}: expected shape \(4096, 1\), found \(2048, 1\)"):
        from_bnb_state_dict(sd, P)


@pytest.mark.parametrize("suffix,nested,bad_dtype,want", [
    ("", True, np.int8, "uint8"), (".absmax", True, np.float32, "uint8"),
    (".absmax", False, np.float16, "float32"), (".absmax", False, np.uint8, "float32"),
    (".quant_map", True, np.float64, "float32"), (".nested_absmax", True, np.float16, "float32")])
def test_wrong_dtype(weight, suffix, nested, bad_dtype, want):
    sd = _sd(weight, nested)
    sd[P + suffix] = sd[P + suffix].astype(bad_dtype)
    found = np.dtype(bad_dtype).name
    with pytest.raises(ValueError, match=rf"{P}{suffix}: expected dtype {want}, found {found}"):
        from_bnb_state_dict(sd, P)


def test_corrupt_json(weight):
    sd = _sd(weight)
    key = f"{P}.quant_state.bitsandbytes__nf4"
    sd[key] = np.frombuffer(b'{"quant_type": "nf4", "blocksize": 6', np.uint8).copy()
    with pytest.raises(ValueError, match=f"{key}: the quant state is not valid JSON"):
        from_bnb_state_dict(sd, P)
    sd[key] = np.frombuffer(b"\xff\xfe\x00", np.uint8).copy()
    with pytest.raises(ValueError, match="not valid JSON"):
        from_bnb_state_dict(sd, P)


@pytest.mark.parametrize("field", ["quant_type", "blocksize", "dtype", "shape"])
def test_json_missing_field(weight, field):
    with pytest.raises(ValueError, match=f"the quant state lacks '{field}'"):
        from_bnb_state_dict(_with_meta(_sd(weight), **{field: None}), P)


def test_json_bad_values(weight):
    with pytest.raises(ValueError, match="unknown quant_type 'nf3'"):
        from_bnb_state_dict(_with_meta(_sd(weight), quant_type="nf3"), P)
    with pytest.raises(ValueError, match="block_size=48 is not allowed"):
        from_bnb_state_dict(_with_meta(_sd(weight), blocksize=48), P)
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        from_bnb_state_dict(_with_meta(_sd(weight), dtype="int8"), P)
    with pytest.raises(ValueError, match="nested_blocksize=128 is not allowed|"
                                         "nested_block_size=128 is not allowed"):
        from_bnb_state_dict(_with_meta(_sd(weight), nested_blocksize=128), P)
    with pytest.raises(ValueError, match="needs 'nested_offset'"):
        from_bnb_state_dict(_with_meta(_sd(weight), nested_offset=None), P)


def test_wrong_code_tables(weight):
    sd = _sd(weight, qtype="fp4")
    sd[f"{P}.quant_map"] = qj.quant.NF4.copy()
    with pytest.raises(ValueError, match=f"{P}.quant_map is not bitsandbytes' fp4 codebook"):
        from_bnb_state_dict(sd, P)
    sd = _sd(weight)
    sd[f"{P}.nested_quant_map"] = np.linspace(-1, 1, 256, dtype=np.float32)
    with pytest.raises(ValueError, match="nested_quant_map is not bitsandbytes' signed 8-bit"):
        from_bnb_state_dict(sd, P)


def test_to_bnb_state_dict_rejects_int4_and_stacked(weight):
    with pytest.raises(ValueError, match="bitsandbytes stores only .* this QTensor is 'int4'"):
        to_bnb_state_dict(quantize(weight, "int4"), P)
    import jax
    q = quantize(weight)
    stacked = jax.tree.map(lambda *a: jnp.stack(a), q, q)
    with pytest.raises(ValueError, match=r"stacked \(leading axes \(2,\)\): index it first"):
        to_bnb_state_dict(stacked, P)


# -- ops ------------------------------------------------------------------------------------

def test_linear_bad_input(rng, weight):
    q = quantize(weight)  # [out, in] = [32, 128]
    with pytest.raises(ValueError, match=r"x has 32 input features but the weight is "
                                         r"\[out, in\] = \[32, 128\]"):
        linear(jnp.ones((4, 32)), q)
    with pytest.raises(ValueError, match=r"expects a 2-D \[out, in\] QTensor, got shape \(2, 64, 64\)"):
        linear(jnp.ones((4, 64)), quantize(jnp.ones((2, 64, 64))))
    with pytest.raises(TypeError, match="linear expects a QTensor weight, got ndarray"):
        linear(jnp.ones((4, 128)), np.asarray(weight))
    with pytest.raises(ValueError, match=r"unknown impl 'cuda'; expected one of \('auto'"):
        linear(jnp.ones((4, 128)), q, impl="cuda")
    with pytest.raises(ValueError, match="unknown impl 'triton'"):
        dequantize(q, impl="triton")
    with pytest.raises(TypeError, match="dequantize expects a QTensor, got ArrayImpl"):
        dequantize(weight)
