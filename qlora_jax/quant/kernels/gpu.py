"""Triton-style Pallas kernels: dequantize, x @ W.T and dy @ W reading W in 4 bits.

These run through the Pallas Triton lowering on NVIDIA GPUs and in interpret
mode anywhere (that is how the CPU tests run them). Refs are whole arrays; each
program computes its offsets from ``pl.program_id`` and masks every load and
store, so any shape works (tiles need not divide it).

Kernels (``[N, K]`` = ``[out, in]`` weight, M tokens):

* ``dequantize``: the flat element stream in tiles of whole quantization
  blocks; any shape, any number of elements.
* ``linear`` (``x @ W.T``) and ``linear_grad_input`` (``dy @ W``): for a 2-D
  weight whose rows are aligned to blocks (``K % block_size == 0``). ``x @ W.T``
  at M = 1 runs the row GEMV of ``gemv.py`` (decoding); ``dy @ W`` at M = 1 a
  tiled GEMV here (multiply-add on CUDA cores, N split over programs, the
  partial sums added by XLA). 2 <= M <= 64 run a tiled kernel on tensor cores
  (16- or 64-row tiles, the weight tile decoded in registers each K step, K
  split over programs). More rows run this module's ``dequantize`` and then an
  XLA (cuBLAS) matmul: the fused kernel decodes every weight tile once per M
  tile, which measured ~4x slower than the two passes at 4096 tokens on an H100
  (benchmarks/RESULTS.md). Weights whose rows are not aligned to blocks always
  take the two-pass path.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from qlora_jax.quant.kernels import _decode as dec
from qlora_jax.quant.kernels import gemv
from qlora_jax.quant.kernels import _call
from qlora_jax.quant.kernels.gemv import GemvConfig
from qlora_jax.quant.layer_view import LayerView
from qlora_jax.quant.qtensor import QTensor

try:
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    plgpu = None


# Codebook lookup used when a config names none (see _decode.lookup; interpret mode
# always runs "prmt" as the equivalent select tree).
DEFAULT_LUT = {"dequant": "prmt", "matmul": "prmt"}


@dataclasses.dataclass(frozen=True)
class DequantConfig:
    """Tiles of the dequantization kernel: ``elements`` a program (whole blocks)."""

    elements: int = 16384
    num_warps: int = 8
    num_stages: int = 1
    lut: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class MatmulConfig:
    """Tiles of the linear kernels. ``bm=None`` means the GEMV kernel (M = 1).

    ``split`` cuts the reduction axis over programs (partial sums in float32,
    added by XLA afterwards); ``None`` picks it from the device's SM count. ``lut``: the
    codebook lookup (``_decode.lookup``; ``None``: ``DEFAULT_LUT``). ``"prmt_bf16"`` (bfloat16
    inputs, opt-in, not yet measured on a GPU: RESULTS.md session 8) looks values up in the
    codebook rounded to bfloat16, ~15% fewer instructions a weight in the 2-64-token kernel.
    """

    bm: Optional[int] = None
    bn: int = 64
    bk: int = 256
    split: Optional[int] = None
    num_warps: int = 4
    num_stages: int = 3
    lut: Optional[str] = None


# ---------------------------------------------------------------------------------------------
# Dequantization of the flat element stream.
# ---------------------------------------------------------------------------------------------

def _dequant_kernel(*refs, n, n_packed, n_blocks, block_size, tb, q_static, lut, exact,
                    out_dtype, aliased, layered=False):
    # Tiles that divide the element count exactly need no bound checks (a static fact).
    masked = n % (tb * block_size) != 0
    nq = dec.num_qrefs(q_static[1])
    qrefs = _call.qrefs(list(refs[:nq]), q_static, lut, exact)
    out_ref = refs[-1]
    # A layer of a stacked weight (``layered``): the refs hold every layer, flat, and the
    # layer index arrives in a one-element ref; offsets move to that layer's slice.
    p_base = a_base = 0
    if layered:
        layer = refs[nq][0]
        p_base, a_base = layer * n_packed, layer * n_blocks
        qrefs.nested_base, qrefs.offset_index = layer * q_static[3], layer
    b0 = pl.program_id(0) * tb
    half = block_size // 2
    p_idx = b0 * half + jnp.arange(tb * half, dtype=jnp.int32)
    packed = dec.load(qrefs.packed_ref.at[pl.ds(p_base + b0 * half, tb * half)],
                      mask=(p_idx < n_packed) if masked else None, other=0)
    codes = dec.unpack_codes(packed.reshape(tb, half), dec.code_dtype(lut, exact))
    values = dec.lookup(codes, qrefs.table_ref, qrefs.table, lut, exact)
    b_idx = b0 + jnp.arange(tb, dtype=jnp.int32)
    raw = dec.load(qrefs.absmax_ref.at[pl.ds(a_base + b0, tb)],
                   mask=(b_idx < n_blocks) if masked else None, other=0)
    absmax = dec.decode_absmax(raw, b_idx, qrefs)
    out = (values * absmax[:, None]).astype(out_dtype).reshape(tb * block_size)
    o_idx = b0 * block_size + jnp.arange(tb * block_size, dtype=jnp.int32)
    dec.store(out_ref.at[pl.ds(b0 * block_size, tb * block_size)], out,
              mask=(o_idx < n) if masked else None)


def dequantize_flat(q: QTensor, dtype: Any, config: DequantConfig = DequantConfig(),
                    out: Optional[jax.Array] = None, interpret: Optional[bool] = None,
                    layer: Optional[jax.Array] = None) -> jax.Array:
    """Dequantizes an unstacked QTensor to a flat ``[n]`` array of ``dtype``; with ``layer``
    (int32 scalar), layer ``layer`` of a QTensor stacked along one axis, read in place."""
    if config.lut == "prmt_bf16":
        raise ValueError("lut='prmt_bf16' is for the matmul kernels: dequantization is exact")
    interpret = _call.interpret() if interpret is None else interpret
    n, bs = q.num_elements, q.block_size
    tb = max(config.elements // bs, 1)
    out_shape = jax.ShapeDtypeStruct((n,), jnp.dtype(dtype))
    inputs = _call.q_inputs(q, q.packed.reshape(-1), q.absmax.reshape(-1))
    if layer is not None:
        inputs.append(jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)))
    inputs, aliases = _call.with_out(inputs, out_shape, out)
    kernel = functools.partial(
        _dequant_kernel, n=n, n_packed=int(q.packed.shape[-1]), n_blocks=q.num_blocks,
        block_size=bs, tb=tb, q_static=_call.q_static(q),
        lut=config.lut or DEFAULT_LUT["dequant"], exact=not interpret,
        out_dtype=jnp.dtype(dtype), aliased=out is not None, layered=layer is not None)
    name = "qlora_dequantize_4bit" if layer is None else "qlora_dequantize_4bit_layer"
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=(pl.cdiv(q.num_blocks, tb),),
        input_output_aliases=aliases, name=name,
        **_call.params(config.num_warps, config.num_stages, interpret))(*inputs)


def dequantize(q: QTensor, dtype: Any = None, config: DequantConfig = DequantConfig(),
               interpret: Optional[bool] = None) -> jax.Array:
    """Dequantizes a QTensor (stacked ones too) to ``dtype`` (default: its own)."""
    dtype = q.dtype if dtype is None else jnp.dtype(dtype)
    if not q.stack_shape:
        return dequantize_flat(q, dtype, config, interpret=interpret).reshape(q.logical_shape)
    flat = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[len(q.stack_shape):]), q)
    parts = [dequantize_flat(jax.tree.map(lambda a, i=i: a[i], flat), dtype, config,
                             interpret=interpret)
             for i in range(int(np.prod(q.stack_shape)))]
    return jnp.stack(parts).reshape(q.shape)


def dequantize_layer(view: LayerView, dtype: Any = None, config: DequantConfig = DequantConfig(),
                     out: Optional[jax.Array] = None, interpret: Optional[bool] = None
                     ) -> jax.Array:
    """Dequantizes layer ``view.index`` of a stacked QTensor in place (no slice is copied).

    Equals ``dequantize(view.materialize(), dtype)`` bit for bit; the result has the
    layer's logical shape. The stack's arrays must fit int32 offsets (``view.fits_int32()``).
    """
    if not view.fits_int32():
        raise ValueError(f"{view!r}: a stacked array exceeds 2**31 elements; the in-place "
                         "kernel indexes with int32 (use view.materialize())")
    q = view.stacked
    dtype = q.dtype if dtype is None else jnp.dtype(dtype)
    return dequantize_flat(q, dtype, config, out, interpret,
                           layer=view.index).reshape(q.logical_shape)


# ---------------------------------------------------------------------------------------------
# Linear kernels for a 2-D weight with rows aligned to blocks.
# ---------------------------------------------------------------------------------------------

def aligned(q: QTensor, layered: bool = False) -> bool:
    """True when the fused linear kernels can read this weight (2-D, rows = whole blocks);
    ``layered``: a weight stacked along one layer axis, read a layer at a time in place."""
    stack_ok = len(q.stack_shape) == 1 if layered else not q.stack_shape
    return (stack_ok and len(q.logical_shape) == 2
            and q.logical_shape[1] % q.block_size == 0)


def _split(config: MatmulConfig, programs: int, tiles: int, interpret: bool) -> int:
    """Programs along the reduction axis: enough to give every SM ~4 programs."""
    return _call.split_count(config.split, 4, 32, programs, tiles, interpret)


def _gemv_kernel(*refs, transpose, n_rows, n_cols, block_size, bn, bk, tps, q_static, lut,
                 exact, aliased, masked, layered=False):
    """One program: a ``bn x bk`` window sliding along the reduction axis (split ``s``)."""
    nq = dec.num_qrefs(q_static[1])
    v_ref = refs[0]
    qrefs = _call.qrefs(list(refs[1:1 + nq]), q_static, lut, exact)
    row_base = _call.layer_base(list(refs), nq, qrefs, q_static, n_rows, layered)
    out_ref = refs[-1]
    i, s = pl.program_id(0), pl.program_id(1)

    def step(t, acc):
        r = s * tps + t  # reduction tile
        if transpose:  # out[k] = sum_n v[n] W[n, k]: rows n slide, columns fixed
            n0, k0 = r * bn, i * bk
            idx = n0 + jnp.arange(bn, dtype=jnp.int32)
            v = dec.load(v_ref.at[pl.ds(0, 1), pl.ds(n0, bn)],
                         mask=(idx[None, :] < n_rows) if masked else None, other=0).reshape(bn)
            w = dec.weight_tile(qrefs, n0, k0, bn=bn, bk=bk, n_rows=n_rows, n_cols=n_cols,
                                block_size=block_size, masked=masked, row_base=row_base)
            return acc + w * v.astype(jnp.float32)[:, None]
        n0, k0 = i * bn, r * bk  # out[n] = sum_k v[k] W[n, k]
        idx = k0 + jnp.arange(bk, dtype=jnp.int32)
        v = dec.load(v_ref.at[pl.ds(0, 1), pl.ds(k0, bk)],
                     mask=(idx[None, :] < n_cols) if masked else None, other=0).reshape(bk)
        w = dec.weight_tile(qrefs, n0, k0, bn=bn, bk=bk, n_rows=n_rows, n_cols=n_cols,
                            block_size=block_size, masked=masked, row_base=row_base)
        return acc + w * v.astype(jnp.float32)[None, :]

    acc = jax.lax.fori_loop(0, tps, step, jnp.zeros((bn, bk), jnp.float32))
    if transpose:
        k_idx = i * bk + jnp.arange(bk, dtype=jnp.int32)
        dec.store(out_ref.at[s, pl.ds(i * bk, bk)], jnp.sum(acc, axis=0),
                  mask=(k_idx < n_cols) if masked else None)
    else:
        n_idx = i * bn + jnp.arange(bn, dtype=jnp.int32)
        dec.store(out_ref.at[s, pl.ds(i * bn, bn)], jnp.sum(acc, axis=1),
                  mask=(n_idx < n_rows) if masked else None)


def _mm_kernel(*refs, transpose, m, n_rows, n_cols, block_size, bm, bn, bk, tps, q_static, lut,
               exact, split, aliased, layered=False):
    """Tiled matmul; ``transpose=False``: x[M,K] @ W.T, ``True``: dy[M,N] @ W."""
    nq = dec.num_qrefs(q_static[1])
    a_ref = refs[0]
    qrefs = _call.qrefs(list(refs[1:1 + nq]), q_static, lut, exact)
    row_base = _call.layer_base(list(refs), nq, qrefs, q_static, n_rows, layered)
    out_ref = refs[-1]
    i, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    m0 = i * bm
    rows = m0 + jnp.arange(bm, dtype=jnp.int32)[:, None]
    dtype = a_ref.dtype
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None

    def step(t, acc):
        r = s * tps + t
        if transpose:  # acc[bm, bk] += dy[bm, bn] @ W[bn, bk]
            n0, k0 = r * bn, j * bk
            cols = n0 + jnp.arange(bn, dtype=jnp.int32)[None, :]
            a = dec.load(a_ref.at[pl.ds(m0, bm), pl.ds(n0, bn)],
                         mask=(rows < m) & (cols < n_rows), other=0)
            w = dec.weight_tile(qrefs, n0, k0, bn=bn, bk=bk, n_rows=n_rows, n_cols=n_cols,
                                block_size=block_size, row_base=row_base).astype(dtype)
            return acc + jax.lax.dot_general(a, w, (((1,), (0,)), ((), ())),
                                             precision=precision,
                                             preferred_element_type=jnp.float32)
        n0, k0 = j * bn, r * bk  # acc[bm, bn] += x[bm, bk] @ W[bn, bk].T
        cols = k0 + jnp.arange(bk, dtype=jnp.int32)[None, :]
        a = dec.load(a_ref.at[pl.ds(m0, bm), pl.ds(k0, bk)],
                     mask=(rows < m) & (cols < n_cols), other=0)
        w = dec.weight_tile(qrefs, n0, k0, bn=bn, bk=bk, n_rows=n_rows, n_cols=n_cols,
                            block_size=block_size, row_base=row_base).astype(dtype)
        return acc + jax.lax.dot_general(a, w, (((1,), (1,)), ((), ())), precision=precision,
                                         preferred_element_type=jnp.float32)

    width = bk if transpose else bn
    limit = n_cols if transpose else n_rows
    acc = jax.lax.fori_loop(0, tps, step, jnp.zeros((bm, width), jnp.float32))
    c = j * width + jnp.arange(width, dtype=jnp.int32)[None, :]
    mask = (rows < m) & (c < limit)
    if split == 1:
        dec.store(out_ref.at[pl.ds(m0, bm), pl.ds(j * width, width)],
                  acc.astype(out_ref.dtype), mask=mask)
    else:
        dec.store(out_ref.at[s, pl.ds(m0, bm), pl.ds(j * width, width)], acc, mask=mask)


def default_config(m: int, n: int, k: int, transpose: bool, interpret: bool) -> MatmulConfig:
    """Tile heuristics (see benchmarks/RESULTS.md for the measurements behind them)."""
    if m == 1:
        if interpret:
            return MatmulConfig(bm=None, bn=32, bk=128, split=1)
        # H100 sweeps on 4096 x 14336 (RESULTS.md): 8 rows a program, 2 warps.
        return MatmulConfig(bm=None, bn=8, bk=1024 if transpose else 512, num_warps=2,
                            num_stages=3)
    if interpret:
        return MatmulConfig(bm=16 if m <= 16 else 64, bn=32, bk=64, split=1)
    if m <= FUSED_MAX_TOKENS:
        config = _small_m_config(m, transpose)
        # x @ W.T only (decoding batches; not the backward's dy @ W): tuning runs may replace
        # tiles, say QLORA_JAX_MATMUL_CONFIG=lut=prmt_bf16,num_stages=2
        return config if transpose else _call.env_overrides(config, "QLORA_JAX_MATMUL_CONFIG")
    return MatmulConfig(bm=128, bn=128, bk=64, split=1, num_warps=8, num_stages=3)


def _small_m_config(m: int, transpose: bool) -> MatmulConfig:
    if m <= 16:  # H100 sweep at 16 tokens on 4096 x 14336 (RESULTS.md)
        return MatmulConfig(bm=16, bn=64, bk=128 if transpose else 256, num_warps=4,
                            num_stages=3)
    return MatmulConfig(bm=64, bn=64, bk=128, num_warps=4, num_stages=3)


def matmul_4bit(a: jax.Array, q: QTensor, *, transpose: bool,
                config: Optional[MatmulConfig] = None, out: Optional[jax.Array] = None,
                interpret: Optional[bool] = None, layer: Optional[jax.Array] = None
                ) -> jax.Array:
    """``a @ W.T`` (``transpose=False``, a = x [M, K]) or ``a @ W`` (a = dy [M, N]).

    The weight must be ``aligned``. ``out`` (tests) is an aliased buffer the
    kernel must overwrite: the result itself, or the float32 partial sums
    ``[split, M, width]`` when the reduction is split. With ``layer`` (int32 scalar), ``q`` is
    stacked along one layer axis and layer ``layer`` is read in place (no slice is copied).
    """
    interpret = _call.interpret() if interpret is None else interpret
    n_rows, n_cols = q.logical_shape
    m = a.shape[0]
    if m == 1 and not transpose and (config is None or isinstance(config, GemvConfig)):
        return gemv.gemv_4bit(a, q, config, out=out, interpret=interpret, layer=layer)
    width = n_cols if transpose else n_rows  # output columns
    red = n_rows if transpose else n_cols  # reduction length
    config = config or default_config(m, n_rows, n_cols, transpose, interpret)
    if config.lut == "prmt_bf16" and a.dtype != jnp.bfloat16:
        raise ValueError(f"lut='prmt_bf16' rounds the codebook to bfloat16: for bfloat16 "
                         f"inputs only, got {a.dtype}")
    bs = q.block_size
    bk = config.bk
    if bk % bs and bs % bk:
        raise ValueError(f"bk={bk} and block_size={bs} must divide one another")
    common = dict(transpose=transpose, n_rows=n_rows, n_cols=n_cols, block_size=bs,
                  q_static=_call.q_static(q), lut=config.lut or DEFAULT_LUT["matmul"],
                  exact=not interpret, aliased=out is not None, layered=layer is not None)
    qin = _call.weight_2d(q)
    if layer is not None:
        qin.append(jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)))
    if config.bm is None:  # GEMV
        if m != 1:
            raise ValueError(f"the GEMV kernel takes one row, got {m}")
        red_tile = config.bn if transpose else bk
        out_tile = bk if transpose else config.bn
        n_out = pl.cdiv(width, out_tile)
        tiles = pl.cdiv(red, red_tile)
        split = _split(config, n_out, tiles, interpret)
        tps = pl.cdiv(tiles, split)
        split = pl.cdiv(tiles, tps)
        out_shape = jax.ShapeDtypeStruct((split, width), jnp.float32)
        inputs, aliases = _call.with_out([a] + qin, out_shape, out)
        masked = (n_rows % config.bn != 0 or n_cols % bk != 0 or tiles % tps != 0)
        kernel = functools.partial(_gemv_kernel, bn=config.bn, bk=bk, tps=tps, masked=masked,
                                   **common)
        part = pl.pallas_call(kernel, out_shape=out_shape, grid=(n_out, split),
                              input_output_aliases=aliases, name="qlora_gemv_4bit",
                              **_call.params(config.num_warps, config.num_stages, interpret)
                              )(*inputs)
        return part.sum(axis=0, dtype=jnp.float32).astype(a.dtype)[None, :]
    bm, bn = config.bm, config.bn
    red_tile = bn if transpose else bk
    out_tile = bk if transpose else bn
    grid_mn = (pl.cdiv(m, bm), pl.cdiv(width, out_tile))
    tiles = pl.cdiv(red, red_tile)
    split = _split(config, grid_mn[0] * grid_mn[1], tiles, interpret)
    tps = pl.cdiv(tiles, split)
    split = pl.cdiv(tiles, tps)
    if split == 1:
        out_shape = jax.ShapeDtypeStruct((m, width), a.dtype)
    else:
        out_shape = jax.ShapeDtypeStruct((split, m, width), jnp.float32)
    inputs, aliases = _call.with_out([a] + qin, out_shape, out)
    kernel = functools.partial(_mm_kernel, m=m, bm=bm, bn=bn, bk=bk, tps=tps, split=split,
                               **common)
    res = pl.pallas_call(kernel, out_shape=out_shape, grid=grid_mn + (split,),
                         input_output_aliases=aliases, name="qlora_matmul_4bit",
                         **_call.params(config.num_warps, config.num_stages, interpret))(*inputs)
    if split == 1:
        return res
    return res.sum(axis=0, dtype=jnp.float32).astype(a.dtype)


def _two_pass(a: jax.Array, q: QTensor, transpose: bool, interpret: Optional[bool]
              ) -> jax.Array:
    """The Pallas dequantization to ``a.dtype``, then an XLA (cuBLAS) matmul.

    Used for weights the fused kernels cannot read (rows not aligned to blocks)
    and, by default, for M > FUSED_MAX_TOKENS, where it measured faster than
    the fused tensor-core kernel (benchmarks/RESULTS.md). The dequantized weight
    is a temporary of this call; nothing of its size is kept for the backward.
    """
    interpret = _call.interpret() if interpret is None else interpret
    w = dequantize(q, a.dtype, interpret=interpret)
    return dot_dequantized(a, w, transpose, interpret)


def dot_dequantized(a: jax.Array, w: jax.Array, transpose: bool,
                    interpret: Optional[bool] = None) -> jax.Array:
    """The second pass: ``a @ w.T`` (``transpose=False``) or ``a @ w``, float32 accumulation."""
    interpret = _call.interpret() if interpret is None else interpret
    w = w if transpose else w.T
    if a.dtype == jnp.float32:
        return jnp.dot(a, w, precision=jax.lax.Precision.HIGHEST)
    if interpret:  # CPU: ask for float32 accumulation explicitly
        return jnp.dot(a, w, preferred_element_type=jnp.float32).astype(a.dtype)
    # GPU: cuBLAS accumulates 16-bit products in float32 and writes a.dtype directly
    # (a float32 result plus a cast would cost one more pass over [M, N]).
    return jnp.dot(a, w)


def _use_fused(a: jax.Array, q: QTensor, config: Optional[MatmulConfig],
               layered: bool = False) -> bool:
    if not aligned(q, layered):
        return False
    if config is not None:
        return True
    return a.shape[0] <= FUSED_MAX_TOKENS


# Token counts up to which the fused kernels run by default (the row GEMV at M = 1, the tiled
# kernel up to 64: 16-row tiles to 16, 64-row tiles above); above, the two-pass path measured
# faster (benchmarks/RESULTS.md: at 32 and 64 tokens the 64-row tiles took 76-79 us against
# 85-89 us for dequantize + cuBLAS on 4096 x 14336 and 14336 x 4096, H200).
FUSED_MAX_TOKENS = 64


def linear(x2d: jax.Array, q: QTensor, config: Optional[MatmulConfig] = None,
           interpret: Optional[bool] = None) -> jax.Array:
    """``x2d @ W.T``: ``[M, in] -> [M, out]`` for a 2-D ``[out, in]`` QTensor.

    ``config`` forces the fused kernels with those tiles (tests, benchmarks).
    """
    if not _use_fused(x2d, q, config):
        return _two_pass(x2d, q, False, interpret)
    return matmul_4bit(x2d, q, transpose=False, config=config, interpret=interpret)


def linear_grad_input(dy2d: jax.Array, q: QTensor, config: Optional[MatmulConfig] = None,
                      interpret: Optional[bool] = None) -> jax.Array:
    """``dy2d @ W``: ``[M, out] -> [M, in]`` for a 2-D ``[out, in]`` QTensor."""
    if not _use_fused(dy2d, q, config):
        return _two_pass(dy2d, q, True, interpret)
    return matmul_4bit(dy2d, q, transpose=True, config=config, interpret=interpret)


def linear_layer(x2d: jax.Array, view: LayerView, config: Optional[MatmulConfig] = None,
                 interpret: Optional[bool] = None) -> jax.Array:
    """``x2d @ W_i.T`` for layer ``i = view.index`` of a stacked weight, read in place.

    Up to ``FUSED_MAX_TOKENS`` rows (decoding) the fused GEMV / small-M kernels read the
    layer's codes where they lie; more rows dequantize the layer in place and run cuBLAS.
    Equals ``linear(x2d, view.materialize())``: the same kernels on the same values.
    """
    _check_view(view)
    if _use_fused(x2d, view.stacked, config, layered=True):
        return matmul_4bit(x2d, view.stacked, transpose=False, config=config,
                           interpret=interpret, layer=view.index)
    return dot_dequantized(x2d, dequantize_layer(view, x2d.dtype, interpret=interpret), False,
                           interpret)


def linear_grad_input_layer(dy2d: jax.Array, view: LayerView,
                            config: Optional[MatmulConfig] = None,
                            interpret: Optional[bool] = None) -> jax.Array:
    """``dy2d @ W_i`` for layer ``i = view.index`` of a stacked weight, read in place."""
    _check_view(view)
    if _use_fused(dy2d, view.stacked, config, layered=True):
        return matmul_4bit(dy2d, view.stacked, transpose=True, config=config,
                           interpret=interpret, layer=view.index)
    return dot_dequantized(dy2d, dequantize_layer(view, dy2d.dtype, interpret=interpret), True,
                           interpret)


def _check_view(view: LayerView) -> None:
    if not view.fits_int32():
        raise ValueError(f"{view!r}: a stacked array exceeds 2**31 elements; the in-place "
                         "kernels index with int32 (use view.materialize())")
