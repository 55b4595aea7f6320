"""Tests of the Pallas 4-bit kernels (interpret mode on CPU; compiled on a GPU).

Random inputs come from the run's seed (tests/conftest.py: fixed by default, QLORA_JAX_SEED to
change it); the seed is in each failure message.
References: ``dequantize_xla`` (bit-exact with bitsandbytes) and float64
matmuls on the dequantized weight.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import qlora_jax as qj
from qlora_jax.quant.blockwise import dequantize_xla
from qlora_jax.quant.kernels import gpu
from tests.conftest import run_seed

# Norm-relative tolerances of a float32-accumulated matmul rounded to the output dtype.
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}


def _rng():
    seed = run_seed()
    return np.random.default_rng(seed), seed


def _weight(rng, shape, scale=None):
    scale = rng.uniform(0.01, 3.0) if scale is None else scale
    w = rng.standard_normal(shape).astype(np.float32) * scale
    w[..., ::7] *= 10.0  # uneven blocks
    return w


def _bits(a):
    a = jnp.asarray(a)
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[a.dtype.itemsize]
    return np.asarray(jax.lax.bitcast_convert_type(a, width))


def _rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


@pytest.mark.parametrize("shape,qtype,block_size,double_quant,dtype", [
    ((37, 129), "nf4", 64, True, jnp.bfloat16),     # odd element count, partial last block
    ((72, 320), "fp4", 64, False, jnp.float16),
    ((5, 1000), "nf4", 128, True, jnp.float32),
    ((3, 7, 90), "int4", 32, True, jnp.bfloat16),   # 3-D
    ((300, 1024), "nf4", 64, True, jnp.bfloat16),   # > 256 blocks: several nested blocks
    ((1, 333), "fp4", 256, True, jnp.float32),      # one partial block
])
def test_dequantize_bit_exact(shape, qtype, block_size, double_quant, dtype):
    rng, seed = _rng()
    q = qj.quant.quantize(_weight(rng, shape), qtype, block_size, double_quant)
    out = qj.quant.dequantize(q, dtype, impl="pallas")
    ref = dequantize_xla(q, dtype)
    assert out.shape == shape and out.dtype == dtype
    np.testing.assert_array_equal(_bits(out), _bits(ref), err_msg=f"seed={seed}")


def test_dequantize_stacked():
    rng, seed = _rng()
    qs = [qj.quant.quantize(_weight(rng, (24, 64)), "nf4") for _ in range(3)]
    q = jax.tree.map(lambda *a: jnp.stack(a), *qs)
    out = qj.quant.dequantize(q, jnp.bfloat16, impl="pallas")
    assert out.shape == (3, 24, 64)
    np.testing.assert_array_equal(_bits(out), _bits(dequantize_xla(q, jnp.bfloat16)),
                                  err_msg=f"seed={seed}")


@pytest.mark.parametrize("elements", [256])
def test_dequantize_overwrites_poisoned_output(elements):
    rng, seed = _rng()
    q = qj.quant.quantize(_weight(rng, (33, 97)), "nf4", 64, True)  # 50 blocks, tiles don't divide
    poison = jnp.full((q.num_elements,), jnp.nan, jnp.float32)
    out = gpu.dequantize_flat(q, jnp.float32, gpu.DequantConfig(elements=elements), out=poison)
    assert not np.isnan(np.asarray(out)).any(), f"unwritten elements, seed={seed}"
    np.testing.assert_array_equal(_bits(out), _bits(dequantize_xla(q, jnp.float32).reshape(-1)))


# (tokens, qtype, dtype, double_quant, [out, in], block_size): every token count of the issue,
# each qtype, activation dtype and double-quant setting, shapes that no tile divides.
LINEAR_CASES = [
    (1, "nf4", jnp.bfloat16, True, (72, 320), 64),
    (1, "fp4", jnp.float32, False, (40, 192), 64),
    (7, "fp4", jnp.float16, True, (72, 320), 64),
    (7, "nf4", jnp.float32, False, (24, 256), 128),   # bk < block_size
    (16, "nf4", jnp.bfloat16, False, (100, 160), 32),  # several blocks a K tile
    (16, "fp4", jnp.bfloat16, True, (72, 320), 64),
    (40, "nf4", jnp.float16, True, (72, 320), 64),
    (40, "fp4", jnp.float32, True, (33, 128), 64),
    (300, "nf4", jnp.bfloat16, True, (72, 320), 64),
    (300, "fp4", jnp.float16, False, (40, 192), 64),
]


@pytest.mark.parametrize("tokens,qtype,dtype,double_quant,shape,block_size", LINEAR_CASES)
def test_linear_forward_and_input_gradient(tokens, qtype, dtype, double_quant, shape,
                                           block_size):
    rng, seed = _rng()
    q = qj.quant.quantize(_weight(rng, shape), qtype, block_size, double_quant)
    x = jnp.asarray(rng.standard_normal((tokens, shape[1])), dtype)
    dy = jnp.asarray(rng.standard_normal((tokens, shape[0])), dtype)
    y, vjp = jax.vjp(lambda v: qj.quant.linear(v, q, impl="pallas"), x)
    (dx,) = vjp(dy)
    w = np.asarray(dequantize_xla(q, dtype), np.float64)
    xf, dyf = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    assert y.dtype == dtype and y.shape == (tokens, shape[0])
    assert dx.dtype == dtype and dx.shape == x.shape
    msg = f"seed={seed}"
    assert np.isfinite(np.asarray(y, np.float32)).all(), msg
    assert _rel(y, xf @ w.T) < TOL[dtype], (_rel(y, xf @ w.T), msg)
    assert _rel(dx, dyf @ w) < TOL[dtype], (_rel(dx, dyf @ w), msg)


@pytest.mark.parametrize("shape,block_size", [((20, 100), 64), ((9, 33), 32)])
def test_linear_unaligned_weight_falls_back(shape, block_size):
    """in % block_size != 0 (rows not aligned to blocks): Pallas dequantize + XLA matmul."""
    rng, seed = _rng()
    q = qj.quant.quantize(_weight(rng, shape), "nf4", block_size, True)
    assert not gpu.aligned(q)
    x = jnp.asarray(rng.standard_normal((3, shape[1])), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((3, shape[0])), jnp.float32)
    y, vjp = jax.vjp(lambda v: qj.quant.linear(v, q, impl="pallas"), x)
    w = np.asarray(dequantize_xla(q, jnp.float32), np.float64)
    assert _rel(y, np.asarray(x, np.float64) @ w.T) < 1e-5, f"seed={seed}"
    assert _rel(vjp(dy)[0], np.asarray(dy, np.float64) @ w) < 1e-5, f"seed={seed}"


@pytest.mark.parametrize("tokens,dtype,transpose,double_quant", [
    (7, jnp.bfloat16, False, True), (40, jnp.float16, True, False),
    (300, jnp.bfloat16, True, True), (16, jnp.float32, False, False)])
def test_fused_matmul_kernel(tokens, dtype, transpose, double_quant):
    """The fused tensor-core kernel (not the default for M > 1, but kept): x @ W.T and dy @ W."""
    rng, seed = _rng()
    n_out, n_in = 72, 320
    q = qj.quant.quantize(_weight(rng, (n_out, n_in)), "nf4", 64, double_quant)
    a = jnp.asarray(rng.standard_normal((tokens, n_out if transpose else n_in)), dtype)
    config = gpu.MatmulConfig(bm=16 if tokens <= 16 else 64, bn=32, bk=64, split=1)
    got = gpu.matmul_4bit(a, q, transpose=transpose, config=config)
    w = np.asarray(dequantize_xla(q, dtype), np.float64)
    ref = np.asarray(a, np.float64) @ (w if transpose else w.T)
    assert got.dtype == dtype
    assert _rel(got, ref) < TOL[dtype], (_rel(got, ref), f"seed={seed}")


def test_fused_matmul_with_the_bf16_codebook():
    """``lut="prmt_bf16"`` (opt-in): x @ W.T on the codebook rounded to bfloat16, for bfloat16
    inputs; every output written; other dtypes and the dequantization refuse it; the kernel
    lowers for CUDA (Triton) on any host."""
    from qlora_jax.quant.kernels._decode import bf16_table
    rng, seed = _rng()
    n_out, n_in, tokens = 40, 320, 21
    q = qj.quant.quantize(_weight(rng, (n_out, n_in)), "nf4", 64, True)
    a = jnp.asarray(rng.standard_normal((tokens, n_in)), jnp.bfloat16)
    config = gpu.MatmulConfig(bm=16, bn=16, bk=64, split=2, lut="prmt_bf16")
    got = gpu.matmul_4bit(a, q, transpose=False, config=config)
    # the reference: the bf16-rounded codebook times the scales, rounded to bf16 like the tile
    exact = np.asarray(dequantize_xla(q, jnp.float32), np.float64)
    codes = np.stack([np.asarray(q.packed).reshape(n_out, -1) >> 4,
                      np.asarray(q.packed).reshape(n_out, -1) & 15], -1).reshape(n_out, n_in)
    table = qj.quant.codebooks.codebook("nf4")
    rounded = bf16_table(table)
    scale = exact / np.where(table[codes] == 0, 1, table[codes])  # the decoded absmax
    w = np.asarray(jnp.asarray(rounded[codes] * scale, jnp.float32).astype(jnp.bfloat16),
                   np.float64)
    a64 = np.asarray(a, np.float64)
    assert _rel(got, a64 @ w.T) < 4e-3, f"seed={seed}"  # bf16 output rounding
    assert _rel(got, a64 @ exact.T) < TOL[jnp.bfloat16], f"seed={seed}"
    plain = gpu.matmul_4bit(a, q, transpose=False, config=dataclasses.replace(config, lut=None))
    assert not np.array_equal(np.asarray(got, np.float32), np.asarray(plain, np.float32))
    shape = (2, tokens, n_out)
    raw = captured_kernel_output(lambda: gpu.matmul_4bit(
        a, q, transpose=False, config=config, out=jnp.full(shape, jnp.nan, jnp.float32)))
    assert not np.isnan(np.asarray(raw)).any(), f"unwritten outputs, seed={seed}"
    with pytest.raises(ValueError, match="bfloat16 inputs only"):
        gpu.matmul_4bit(a.astype(jnp.float32), q, transpose=False, config=config)
    with pytest.raises(ValueError, match="dequantization is exact"):
        gpu.dequantize_flat(q, jnp.bfloat16, gpu.DequantConfig(lut="prmt_bf16"))
    fn = jax.jit(lambda v, ww: gpu.matmul_4bit(v, ww, transpose=False, config=config,
                                               interpret=False))
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    exported = jax.export.export(fn, platforms=["cuda"], disabled_checks=checks)(a, q)
    assert "qlora_matmul_4bit" in exported.mlir_module()


def test_small_m_tiles_env_override(monkeypatch):
    """QLORA_JAX_MATMUL_CONFIG replaces fields of the 2-64-token x @ W.T tiles (tuning runs);
    the backward's dy @ W, one token and interpret mode keep theirs."""
    monkeypatch.delenv("QLORA_JAX_MATMUL_CONFIG", raising=False)
    base = gpu.default_config(8, 4096, 14336, False, False)
    assert base.bm == 16 and base.lut is None and base.num_stages == 3
    monkeypatch.setenv("QLORA_JAX_MATMUL_CONFIG", "lut=prmt_bf16,num_stages=2")
    assert gpu.default_config(8, 4096, 14336, False, False) == dataclasses.replace(
        base, lut="prmt_bf16", num_stages=2)
    assert gpu.default_config(32, 4096, 14336, False, False).num_stages == 2
    assert gpu.default_config(8, 4096, 14336, True, False).lut is None
    assert gpu.default_config(1, 4096, 14336, False, False).lut is None
    assert gpu.default_config(8, 4096, 14336, False, True).lut is None
    monkeypatch.setenv("QLORA_JAX_MATMUL_CONFIG", "bq=16")
    with pytest.raises(ValueError, match="unknown field 'bq'"):
        gpu.default_config(8, 4096, 14336, False, False)


# Explicit tiles: several tiles along every axis, reductions split over programs.
POISON_CASES = [
    (1, gpu.MatmulConfig(bm=None, bn=16, bk=64, split=3)),
    (1, gpu.MatmulConfig(bm=None, bn=32, bk=128, split=2, lut="select")),
    (21, gpu.MatmulConfig(bm=16, bn=16, bk=64, split=1)),
    (21, gpu.MatmulConfig(bm=16, bn=32, bk=32, split=2, lut="gather")),
]


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("tokens,config", POISON_CASES)
def test_matmul_overwrites_poisoned_output(tokens, config, transpose):
    rng, seed = _rng()
    n_out, n_in = 40, 320
    q = qj.quant.quantize(_weight(rng, (n_out, n_in)), "nf4", 64, True)
    a = jnp.asarray(rng.standard_normal((tokens, n_out if transpose else n_in)), jnp.float32)
    width = n_in if transpose else n_out
    red = n_out if transpose else n_in
    red_tile = config.bn if transpose else config.bk
    out_tile = config.bk if transpose else config.bn
    tiles = -(-red // red_tile)
    if config.bm is None:
        n_progs = -(-width // out_tile)
    else:
        n_progs = -(-tokens // config.bm) * -(-width // out_tile)
    split = gpu._split(config, n_progs, tiles, interpret=True)
    split = -(-tiles // -(-tiles // split))
    if config.bm is None:
        shape = (split, width)
    else:
        shape = (tokens, width) if split == 1 else (split, tokens, width)
    dtype = jnp.float32
    poison = jnp.full(shape, jnp.nan, dtype)
    raw = _raw_call(a, q, transpose, config, poison)
    assert raw.shape == shape
    assert not np.isnan(np.asarray(raw)).any(), f"unwritten outputs, seed={seed}"
    w = np.asarray(dequantize_xla(q, jnp.float32), np.float64)
    ref = np.asarray(a, np.float64) @ (w if transpose else w.T)
    got = raw.sum(axis=0)[None] if config.bm is None else (raw if split == 1 else raw.sum(0))
    assert _rel(got, ref) < 1e-5, f"seed={seed}"


def _raw_call(a, q, transpose, config, poison):
    """The kernel's own output buffer (before XLA adds split partial sums)."""
    return captured_kernel_output(
        lambda: gpu.matmul_4bit(a, q, transpose=transpose, config=config, out=poison))


def captured_kernel_output(call):
    """Runs ``call()`` and returns the output of the (last) ``pallas_call`` it made."""
    captured = {}
    original = gpu.pl.pallas_call

    def spy(*args, **kwargs):
        fn = original(*args, **kwargs)

        def run(*inputs):
            captured["out"] = fn(*inputs)
            return captured["out"]
        return run

    gpu.pl.pallas_call = spy
    try:
        call()
    finally:
        gpu.pl.pallas_call = original
    return captured["out"]


def test_linear_inside_jit_and_grad_has_no_weight_sized_residual():
    rng, seed = _rng()
    q = qj.quant.quantize(_weight(rng, (64, 256)), "nf4", 64, True)
    x = jnp.asarray(rng.standard_normal((5, 256)), jnp.bfloat16)

    def loss(v):
        return jnp.sum(qj.quant.linear(v, q, impl="pallas").astype(jnp.float32) ** 2)

    g = jax.jit(jax.grad(loss))(x)
    g_ref = jax.grad(lambda v: jnp.sum(qj.quant.linear(v, q, impl="xla")
                                       .astype(jnp.float32) ** 2))(x)
    assert _rel(g, g_ref) < 2e-2, f"seed={seed}"
    # The residuals saved for the backward pass: only the QTensor's own 4-bit arrays.
    _, vjp = jax.vjp(lambda v: qj.quant.linear(v, q, impl="pallas"), x)
    leaves = [l for l in jax.tree.leaves(vjp) if hasattr(l, "dtype")]
    assert leaves, "expected the vjp closure to carry residual arrays" 
    biggest = max((l.size * l.dtype.itemsize for l in leaves), default=0)
    assert biggest <= q.packed.size, (biggest, q.packed.size)


def _emulate_ptx(program: str, x: int, inp: str = "$4", n_out: int = 4) -> list:
    """Runs the few PTX integer instructions of ``_decode``'s lookups on one input word
    (register ``inp``); returns output registers ``$0..$(n_out-1)``."""
    def prmt(a, b, c):
        src = [(a >> 8 * i) & 0xFF for i in range(4)] + [(b >> 8 * i) & 0xFF for i in range(4)]
        out = 0
        for i in range(4):
            n = (c >> 4 * i) & 0xF
            byte = src[n & 7]
            if n & 8:  # sign-replicate mode
                byte = 0xFF if byte & 0x80 else 0
            out |= byte << 8 * i
        return out

    def lop3(a, b, c, lut):
        return sum((((lut >> ((((a >> i) & 1) << 2) | (((b >> i) & 1) << 1) | ((c >> i) & 1)))
                     & 1) << i) for i in range(32))

    ops = {"and.b32": lambda a, b: a & b, "or.b32": lambda a, b: a | b,
           "shr.b32": lambda a, b: a >> b, "shl.b32": lambda a, b: (a << b) & 0xFFFFFFFF,
           "mov.b32": lambda a: a, "prmt.b32": prmt, "lop3.b32": lop3}
    regs = {inp: x}
    for line in program.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        dst, *args = [a.strip() for a in rest.split(",")]
        regs[dst] = ops[op](*[regs[a] if a in regs else int(a, 0) for a in args])
    return [regs[f"${i}"] for i in range(n_out)]


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("qtype", ["nf4", "fp4", "int4"])
def test_prmt_lookup_program_matches_codebook(qtype, bf16):
    """The GPU byte-permute lookup (PTX, only compiled on a GPU) emulated on random codes; with
    ``bf16`` the two-plane program of ``lut="prmt_bf16"`` on the bf16-rounded codebook."""
    from qlora_jax.quant import codebooks
    from qlora_jax.quant.kernels._decode import _prmt_asm, bf16_table
    rng, seed = _rng()
    table = codebooks.codebook(qtype)
    table = bf16_table(table) if bf16 else table
    program = _prmt_asm(table, bf16=bf16)
    words = table.view(np.uint32)
    for codes in rng.integers(0, 16, (500, 4)):
        x = int(codes[0] | codes[1] << 8 | codes[2] << 16 | codes[3] << 24)
        assert _emulate_ptx(program, x) == [int(words[c]) for c in codes], (codes, seed)


# --- Mosaic TPU kernels, in TPU interpret mode (outputs start as NaN there: an element the
# kernel fails to write stays NaN, so the finite checks below are the poisoned-output check).

@pytest.mark.parametrize("shape,qtype,double_quant,dtype", [
    ((37, 129), "nf4", True, jnp.bfloat16),   # partial last block, odd element count
    ((600, 64), "fp4", False, jnp.float32),   # several row tiles, the last one partial
])
def test_tpu_dequantize_bit_exact(shape, qtype, double_quant, dtype):
    from qlora_jax.quant.kernels import tpu
    rng, seed = _rng()
    q = qj.quant.quantize(_weight(rng, shape), qtype, 64, double_quant)
    out = tpu.dequantize(q, dtype, interpret=True)
    assert out.shape == shape and out.dtype == dtype
    np.testing.assert_array_equal(_bits(out), _bits(dequantize_xla(q, dtype)),
                                  err_msg=f"seed={seed}")


@pytest.mark.parametrize("tokens,qtype,dtype,double_quant,shape", [
    (1, "nf4", jnp.bfloat16, True, (72, 320)),
    (16, "fp4", jnp.float32, False, (300, 128)),  # N > the 256-row tile: a partial tile
    (40, "nf4", jnp.float16, True, (40, 192)),
    (300, "fp4", jnp.float32, True, (24, 256)),   # M > the 256-row tile
    (7, "nf4", jnp.float32, True, (20, 100)),     # rows not aligned to blocks: two-pass
])
def test_tpu_linear_forward_and_input_gradient(tokens, qtype, dtype, double_quant, shape):
    from qlora_jax.quant.kernels import tpu
    rng, seed = _rng()
    q = qj.quant.quantize(_weight(rng, shape), qtype, 64, double_quant)
    x = jnp.asarray(rng.standard_normal((tokens, shape[1])), dtype)
    dy = jnp.asarray(rng.standard_normal((tokens, shape[0])), dtype)
    y = tpu.linear(x, q, interpret=True)
    dx = tpu.linear_grad_input(dy, q, interpret=True)
    w = np.asarray(dequantize_xla(q, dtype), np.float64)
    msg = f"seed={seed}"
    assert y.dtype == dtype and dx.dtype == dtype and dx.shape == x.shape
    assert np.isfinite(np.asarray(y, np.float32)).all(), msg
    assert np.isfinite(np.asarray(dx, np.float32)).all(), msg
    assert _rel(y, np.asarray(x, np.float64) @ w.T) < TOL[dtype], msg
    assert _rel(dx, np.asarray(dy, np.float64) @ w) < TOL[dtype], msg
