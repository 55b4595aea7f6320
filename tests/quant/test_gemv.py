"""The decoding GEMV (``kernels.gemv``): interpret mode on CPU, compiled on a GPU.

Against float64 ``x @ W.T`` on the dequantized weight (``dequantize_xla``, bit-exact with
bitsandbytes); random weights and inputs from the run's seed.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import qlora_jax as qj
from qlora_jax.quant.blockwise import dequantize_xla
from qlora_jax.quant.kernels import gemv, gpu
from qlora_jax.quant.layer_view import LayerView
from tests.conftest import run_seed
from tests.quant.test_kernels import TOL, _emulate_ptx, _rel, _weight, captured_kernel_output


def _ref(x, q):
    w = np.asarray(dequantize_xla(q, jnp.float32), np.float64)
    return np.asarray(x, np.float64) @ w.T


CASES = [  # (shape, qtype, block_size, double_quant, dtype, config)
    ((72, 320), "nf4", 64, True, jnp.bfloat16, gemv.GemvConfig(rows=16, blocks=2,
                                                               bf16_lut=False)),
    ((64, 256), "fp4", 64, False, jnp.float32, gemv.GemvConfig(rows=32, blocks=1, split=2)),
    # rows and steps that do not divide: the last program's rows and the last step's blocks
    # are masked; 3 blocks a row over 2-block steps
    ((100, 384), "nf4", 64, True, jnp.float32, gemv.GemvConfig(rows=64, blocks=4, split=2)),
    ((33, 384), "int4", 128, True, jnp.float16, gemv.GemvConfig(rows=16, blocks=2)),
    # bfloat16 x: the default looks values up in the bf16-rounded codebook
    ((72, 320), "nf4", 64, True, jnp.bfloat16, gemv.GemvConfig(rows=16, blocks=2)),
    ((40, 96), "nf4", 32, True, jnp.float32, gemv.GemvConfig(rows=8, blocks=1, split=3)),
    ((72, 320), "nf4", 64, True, jnp.float32, None),  # the default tiles
    ((100, 384), "fp4", 64, True, jnp.float32, gemv.GemvConfig(rows=64, blocks=4, split=2,
                                                               bf16_lut=False)),
    # the other ways to meet x (masked rows and steps, a split)
    ((100, 384), "nf4", 64, True, jnp.bfloat16, gemv.GemvConfig(rows=64, blocks=4, split=2,
                                                                x_mode="join")),
    ((100, 384), "nf4", 64, True, jnp.float32, gemv.GemvConfig(rows=64, blocks=4, split=2,
                                                               bf16_lut=False, x_mode="join")),
    ((40, 96), "fp4", 32, False, jnp.float32, gemv.GemvConfig(rows=8, blocks=1, split=3,
                                                              x_mode="join")),
]


@pytest.mark.parametrize("shape,qtype,block_size,double_quant,dtype,config", CASES)
def test_gemv_matches_float64(shape, qtype, block_size, double_quant, dtype, config):
    rng, seed = np.random.default_rng(run_seed()), run_seed()
    q = qj.quant.quantize(_weight(rng, shape), qtype, block_size, double_quant)
    x = jnp.asarray(rng.standard_normal((1, shape[1])), dtype)
    y = gemv.gemv_4bit(x, q, config)
    assert y.shape == (1, shape[0]) and y.dtype == dtype
    assert _rel(y, _ref(x, q)) < TOL[dtype], f"seed={seed}"


def test_gemv_is_the_default_for_one_token(monkeypatch):
    """``gpu.linear`` at M = 1 runs the row GEMV, and its result is the GEMV's."""
    rng, seed = np.random.default_rng(run_seed()), run_seed()
    q = qj.quant.quantize(_weight(rng, (48, 256)), "nf4", 64, True)
    x = jnp.asarray(rng.standard_normal((1, 256)), jnp.float32)
    calls = []
    real = gemv.gemv_4bit
    monkeypatch.setattr(gemv, "gemv_4bit", lambda *a, **k: calls.append(1) or real(*a, **k))
    y = gpu.linear(x, q)
    assert calls, "gpu.linear did not run the row GEMV for one token"
    assert _rel(y, _ref(x, q)) < 1e-5, f"seed={seed}"


@pytest.mark.parametrize("config", [gemv.GemvConfig(rows=16, blocks=2, split=2),
                                    gemv.GemvConfig(rows=64, blocks=4, split=1)])
def test_gemv_overwrites_poisoned_output(config):
    """Every partial sum of ``[split, N]`` is written (a NaN buffer comes back finite)."""
    rng, seed = np.random.default_rng(run_seed()), run_seed()
    n, k = 40, 320  # 5 blocks a row: steps of 2 and 4 blocks leave a masked tail
    q = qj.quant.quantize(_weight(rng, (n, k)), "nf4", 64, True)
    x = jnp.asarray(rng.standard_normal((1, k)), jnp.float32)
    steps = -(-(k // 64) // config.blocks)
    split = gemv._split(config, -(-n // config.rows), steps, interpret=True)
    split = -(-steps // -(-steps // split))
    raw = np.asarray(captured_kernel_output(
        lambda: gemv.gemv_4bit(x, q, config, out=jnp.full((split, n), jnp.nan, jnp.float32))))
    assert raw.shape == (split, n) and not np.isnan(raw).any(), f"seed={seed}"
    assert _rel(raw.sum(0)[None], _ref(x, q)) < 1e-5, f"seed={seed}"


def test_gemv_reads_a_layer_of_a_stack_in_place():
    rng, seed = np.random.default_rng(run_seed()), run_seed()
    qs = [qj.quant.quantize(_weight(rng, (48, 192)), "nf4", 64, True) for _ in range(3)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *qs)
    x = jnp.asarray(rng.standard_normal((1, 192)), jnp.bfloat16)
    for i in range(3):
        view = LayerView(stacked, jnp.int32(i))
        got = gemv.gemv_4bit(x, stacked, gemv.GemvConfig(rows=16, blocks=2), layer=view.index)
        want = gemv.gemv_4bit(x, qs[i], gemv.GemvConfig(rows=16, blocks=2))
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                      err_msg=f"layer {i}, seed={seed}")


def test_gemv_rejects_bad_shapes():
    rng = np.random.default_rng(run_seed())
    q = qj.quant.quantize(_weight(rng, (8, 128)), "nf4", 64, True)
    with pytest.raises(ValueError, match="x of shape"):
        gemv.gemv_4bit(jnp.ones((2, 128), jnp.float32), q)
    q = qj.quant.quantize(_weight(rng, (8, 96)), "nf4", 64, True)  # 96 = 1.5 blocks
    with pytest.raises(ValueError, match="not whole blocks"):
        gemv.gemv_4bit(jnp.ones((1, 96), jnp.float32), q)
    q = qj.quant.quantize(_weight(rng, (8, 128)), "nf4", 64, True)
    with pytest.raises(ValueError, match="unknown x_mode 'rows'"):
        gemv.gemv_4bit(jnp.ones((1, 128), jnp.float32), q, gemv.GemvConfig(x_mode="rows"))


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("qtype", ["nf4", "fp4", "int4"])
def test_word_lookup_program_matches_codebook(qtype, bf16):
    """The GPU lookup of the 8 codes of a packed uint32 word (PTX), emulated on random words:
    output j is column j of the word (byte j // 2, high nibble first)."""
    from qlora_jax.quant import codebooks
    from qlora_jax.quant.kernels import _decode as dec
    rng, seed = np.random.default_rng(run_seed()), run_seed()
    table = codebooks.codebook(qtype)
    table = dec.bf16_table(table) if bf16 else table
    program = dec.word_lookup_ptx(table, bf16)
    words = table.view(np.uint32)
    for packed in rng.integers(0, 256, (300, 4)):
        x = int(packed[0] | packed[1] << 8 | packed[2] << 16 | packed[3] << 24)
        codes = [c for b in packed for c in (b >> 4, b & 15)]
        assert _emulate_ptx(program, x, "$8", 8) == [int(words[c]) for c in codes], (packed,
                                                                                     seed)


def test_bf16_table_rounds_to_nearest_bfloat16():
    from qlora_jax.quant import codebooks
    from qlora_jax.quant.kernels import _decode as dec
    for qtype in ("nf4", "fp4", "int4"):
        table = codebooks.codebook(qtype)
        want = np.asarray(jnp.asarray(table).astype(jnp.bfloat16).astype(jnp.float32))
        np.testing.assert_array_equal(dec.bf16_table(table), want)


def test_gemv_bf16_codebook_within_bf16_rounding():
    """``bf16_lut``: weights use the bf16-rounded codebook: the error against the exact
    float64 product stays at bf16 rounding size (2**-9 a weight)."""
    rng, seed = np.random.default_rng(run_seed()), run_seed()
    q = qj.quant.quantize(_weight(rng, (96, 512)), "nf4", 64, True)
    x = jnp.asarray(rng.standard_normal((1, 512)), jnp.float32)
    y = gemv.gemv_4bit(x, q, gemv.GemvConfig(rows=32, blocks=2, bf16_lut=True))
    err = _rel(y, _ref(x, q))
    assert 1e-6 < err < 2 ** -8, f"err={err}, seed={seed}"


def test_gemv_default_config_and_env_override(monkeypatch):
    monkeypatch.delenv("QLORA_JAX_GEMV_CONFIG", raising=False)
    assert gemv.default_config(14336).rows == 128 and gemv.default_config(1024).rows == 32
    assert gemv.default_config(4096, 14336).x_mode == "join"
    assert gemv.default_config(4096, 4096).x_mode == "gather"
    monkeypatch.setenv("QLORA_JAX_GEMV_CONFIG", "rows=64,blocks=2,bf16_lut=False")
    assert gemv.default_config(4096) == gemv.GemvConfig(rows=64, blocks=2, bf16_lut=False)
    monkeypatch.setenv("QLORA_JAX_GEMV_CONFIG", "rows=32,x_mode=join")
    assert gemv.default_config(4096) == gemv.GemvConfig(rows=32, x_mode="join")
    monkeypatch.setenv("QLORA_JAX_GEMV_CONFIG", "rowz=64")
    with pytest.raises(ValueError, match="unknown field 'rowz'"):
        gemv.default_config(4096)


@pytest.mark.parametrize("bf16_lut,x_mode", [(False, "gather"), (True, "gather"),
                                             (True, "join")])
def test_gemv_lowers_for_cuda(bf16_lut, x_mode):
    """The kernel's GPU lowering (Pallas -> Triton IR, including the multi-result inline asm)
    runs on any host: exporting for CUDA lowers it without a GPU."""
    rng = np.random.default_rng(run_seed())
    q = qj.quant.quantize(_weight(rng, (128, 512)), "nf4", 64, True)
    x = jnp.ones((1, 512), jnp.bfloat16)
    config = gemv.GemvConfig(bf16_lut=bf16_lut, x_mode=x_mode)
    fn = jax.jit(lambda v, w: gemv.gemv_4bit(v, w, config, interpret=False))
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    text = jax.export.export(fn, platforms=["cuda"], disabled_checks=checks)(x, q).mlir_module()
    assert "qlora_gemv_rows_4bit" in text
