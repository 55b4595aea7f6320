"""Mosaic TPU Pallas kernels: dequantize, x @ W.T and dy @ W reading W in 4 bits.

Written for the TPU's (8, 128) tiles: every block's last two dimensions are
whole array dimensions, and nothing is gathered (Mosaic has no vector
gather). The two nibbles of a byte are kept apart as two planes instead of
being interleaved in the kernel: for a weight ``[N, K]`` the high nibbles hold
the even columns and the low nibbles the odd ones, so

    x @ W.T = x[:, 0::2] @ W_hi.T + x[:, 1::2] @ W_lo.T,
    dy @ W  = interleave(dy @ W_hi, dy @ W_lo),

with the even/odd split of the activations and the interleave of the results
done by XLA outside the kernels. Codebook and dynamic-map lookups are select
trees (16 and 256 constants); double-quantized absmax are decoded in the
kernels as ``dyn[code] * nested + offset`` (two float32 roundings), with the
nested scale of each absmax repeated outside (4 bytes a block, as a float32
absmax would be).

Status: checked in TPU interpret mode on CPU and lowered to Mosaic MLIR on a
CPU host; never compiled or run on a TPU (none was available).
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from qlora_jax.quant import codebooks
from qlora_jax.quant.qtensor import QTensor

try:
    from jax.experimental.pallas import tpu as pltpu
except ImportError:  # pragma: no cover
    pltpu = None

MAX_FULL_K = 8192  # input features a linear kernel keeps whole in one block


def _select_tree(codes: jax.Array, table: np.ndarray) -> jax.Array:
    """``table[codes]`` for int32 codes by a binary tree of selects (len(table) = 2**b)."""
    level = [jnp.float32(v) for v in np.asarray(table, np.float32)]
    bit = 0
    while len(level) > 1:
        on = (codes & (1 << bit)) != 0
        level = [jnp.where(on, level[2 * j + 1], level[2 * j]) for j in range(len(level) // 2)]
        bit += 1
    return jnp.broadcast_to(level[0], codes.shape)


def _mul_rn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a * b rounded on its own (no FMA with a following add; see _decode.mul_rn)."""
    p = a * b
    return jnp.where(p == p, p, jnp.float32(0))


def _absmax(raw: jax.Array, nested: Optional[jax.Array], offset: Optional[jax.Array]
            ) -> jax.Array:
    if nested is None:
        return raw.astype(jnp.float32)
    dyn = _select_tree(raw.astype(jnp.int32), codebooks.DYNAMIC_MAP)
    return _mul_rn(dyn, nested) + offset


def _planes(packed: jax.Array, table: np.ndarray) -> tuple[jax.Array, jax.Array]:
    p = packed.astype(jnp.int32)
    return _select_tree(p >> 4, table), _select_tree(p & 15, table)


def _interpret_arg(interpret: Optional[bool]) -> dict:
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    if not interpret:
        return {}
    return dict(interpret=pltpu.InterpretParams() if pltpu is not None else True)


def _dq_inputs(q: QTensor, absmax: jax.Array, shape: tuple) -> list:
    """absmax (int32 codes or float32) and, with double quant, nested (repeated) and offset."""
    if not q.double_quant:
        return [absmax.astype(jnp.float32).reshape(shape)]
    nb = absmax.shape[-1]
    nested = jnp.repeat(q.nested_absmax.astype(jnp.float32), q.nested_block_size)[:nb]
    return [absmax.astype(jnp.int32).reshape(shape), nested.reshape(shape),
            jnp.reshape(q.offset, (1, 1)).astype(jnp.float32)]


# ---------------------------------------------------------------------------------------------

def _dequant_kernel(*refs, table, double_quant):
    if double_quant:
        packed_ref, am_ref, nested_ref, off_ref, hi_ref, lo_ref = refs
        absmax = _absmax(am_ref[...], nested_ref[...], off_ref[...])
    else:
        packed_ref, am_ref, hi_ref, lo_ref = refs
        absmax = _absmax(am_ref[...], None, None)
    hi, lo = _planes(packed_ref[...], table)
    hi_ref[...] = (hi * absmax).astype(hi_ref.dtype)
    lo_ref[...] = (lo * absmax).astype(lo_ref.dtype)


def dequantize_flat(q: QTensor, dtype: Any, rows: int = 512,
                    interpret: Optional[bool] = None) -> jax.Array:
    """Dequantizes an unstacked QTensor to a flat ``[n]`` array of ``dtype``.

    Blocks are rows of ``[n_blocks, block_size // 2]`` bytes (the packed array
    is padded to whole blocks when the last one is partial).
    """
    n, bs = q.num_elements, q.block_size
    nb, half = q.num_blocks, bs // 2
    packed = q.packed
    if packed.shape[-1] != nb * half:
        packed = jnp.pad(packed, (0, nb * half - packed.shape[-1]))
    packed = packed.reshape(nb, half)
    tr = min(rows, nb)
    if tr != nb:
        tr = max(32, tr - tr % 32)  # uint8 tiles are (32, 128)
    grid = (pl.cdiv(nb, tr),)
    row = lambda i: (i, 0)  # noqa: E731
    inputs = [packed] + _dq_inputs(q, q.absmax, (nb, 1))
    in_specs = [pl.BlockSpec((tr, half), row), pl.BlockSpec((tr, 1), row)]
    if q.double_quant:
        in_specs += [pl.BlockSpec((tr, 1), row), pl.BlockSpec((1, 1), lambda i: (0, 0))]
    plane = jax.ShapeDtypeStruct((nb, half), jnp.dtype(dtype))
    hi, lo = pl.pallas_call(
        functools.partial(_dequant_kernel, table=codebooks.codebook(q.qtype),
                          double_quant=q.double_quant),
        out_shape=(plane, plane), grid=grid, in_specs=in_specs,
        out_specs=(pl.BlockSpec((tr, half), row), pl.BlockSpec((tr, half), row)),
        name="qlora_dequantize_4bit_tpu", **_interpret_arg(interpret))(*inputs)
    return jnp.stack([hi, lo], axis=-1).reshape(-1)[:n]


def dequantize(q: QTensor, dtype: Any = None, interpret: Optional[bool] = None) -> jax.Array:
    """Dequantizes a QTensor (stacked ones too) to ``dtype`` (default: its own)."""
    dtype = q.dtype if dtype is None else jnp.dtype(dtype)
    if not q.stack_shape:
        return dequantize_flat(q, dtype, interpret=interpret).reshape(q.logical_shape)
    flat = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[len(q.stack_shape):]), q)
    parts = [dequantize_flat(jax.tree.map(lambda a, i=i: a[i], flat), dtype,
                             interpret=interpret)
             for i in range(int(np.prod(q.stack_shape)))]
    return jnp.stack(parts).reshape(q.shape)


# ---------------------------------------------------------------------------------------------

def _weight_planes(refs, table, double_quant, block_size, dtype):
    """Decoded ``(W_hi, W_lo)`` tiles ``[bn, K/2]`` in ``dtype`` from the kernel's weight refs."""
    if double_quant:
        packed_ref, am_ref, nested_ref, off_ref = refs
        absmax = _absmax(am_ref[...], nested_ref[...], off_ref[...])
    else:
        packed_ref, am_ref = refs
        absmax = _absmax(am_ref[...], None, None)
    hi, lo = _planes(packed_ref[...], table)
    bn, kh = hi.shape
    nbt = absmax.shape[1]
    # Repeat each block's absmax over its block_size // 2 columns of a plane with a 0/1
    # matrix on the MXU: exact at HIGHEST precision (every product is x * 1 or x * 0).
    cols = jax.lax.broadcasted_iota(jnp.int32, (nbt, kh), 1) // (block_size // 2)
    expand = (cols == jax.lax.broadcasted_iota(jnp.int32, (nbt, kh), 0)).astype(jnp.float32)
    scale = jnp.dot(absmax, expand, precision=jax.lax.Precision.HIGHEST,
                    preferred_element_type=jnp.float32)
    return (hi * scale).astype(dtype), (lo * scale).astype(dtype)


def _linear_kernel(*refs, table, double_quant, block_size):
    xe_ref, xo_ref = refs[:2]
    out_ref = refs[-1]
    w_hi, w_lo = _weight_planes(refs[2:-1], table, double_quant, block_size, xe_ref.dtype)
    precision = jax.lax.Precision.HIGHEST if xe_ref.dtype == jnp.float32 else None
    dims = (((1,), (1,)), ((), ()))
    acc = jax.lax.dot_general(xe_ref[...], w_hi, dims, precision=precision,
                              preferred_element_type=jnp.float32)
    acc += jax.lax.dot_general(xo_ref[...], w_lo, dims, precision=precision,
                               preferred_element_type=jnp.float32)
    out_ref[...] = acc.astype(out_ref.dtype)


def _grad_kernel(*refs, table, double_quant, block_size, n_steps):
    dy_ref = refs[0]
    even_ref, odd_ref, acc_e, acc_o = refs[-4:]
    n = pl.program_id(1)
    w_hi, w_lo = _weight_planes(refs[1:-4], table, double_quant, block_size, dy_ref.dtype)
    precision = jax.lax.Precision.HIGHEST if dy_ref.dtype == jnp.float32 else None

    @pl.when(n == 0)
    def _():
        acc_e[...] = jnp.zeros_like(acc_e)
        acc_o[...] = jnp.zeros_like(acc_o)

    acc_e[...] += jnp.dot(dy_ref[...], w_hi, precision=precision,
                          preferred_element_type=jnp.float32)
    acc_o[...] += jnp.dot(dy_ref[...], w_lo, precision=precision,
                          preferred_element_type=jnp.float32)

    @pl.when(n == n_steps - 1)
    def _():
        even_ref[...] = acc_e[...].astype(even_ref.dtype)
        odd_ref[...] = acc_o[...].astype(odd_ref.dtype)


def supported(q: QTensor) -> bool:
    """True when the fused TPU kernels read this weight (2-D, rows of whole blocks, K <= 8192)."""
    return (not q.stack_shape and len(q.logical_shape) == 2
            and q.logical_shape[1] % q.block_size == 0 and q.logical_shape[1] <= MAX_FULL_K)


def _weight_inputs(q: QTensor) -> tuple[list, int, int]:
    """Packed ``[N, K/2]``, absmax ``[N, K/block]`` (+ nested, offset), and those widths."""
    n, k = q.logical_shape
    kb = k // q.block_size
    return [q.packed.reshape(n, k // 2)] + _dq_inputs(q, q.absmax, (n, kb)), k // 2, kb


def _tiles(m: int, n: int) -> tuple[int, int]:
    bm = m if m <= 256 else 256
    bn = n if n <= 256 else 256
    return bm, bn


def linear(x2d: jax.Array, q: QTensor, interpret: Optional[bool] = None) -> jax.Array:
    """``x2d @ W.T``: ``[M, in] -> [M, out]`` for a 2-D ``[out, in]`` QTensor."""
    if not supported(q):
        return _two_pass(x2d, q, False, interpret)
    m, k = x2d.shape
    n = q.logical_shape[0]
    bm, bn = _tiles(m, n)
    pair = x2d.reshape(m, k // 2, 2)
    inputs, kh, kb = _weight_inputs(q)
    in_specs = [pl.BlockSpec((bm, kh), lambda i, j: (i, 0))] * 2
    in_specs += [pl.BlockSpec((bn, kh), lambda i, j: (j, 0)),
                 pl.BlockSpec((bn, kb), lambda i, j: (j, 0))]
    if q.double_quant:
        in_specs += [pl.BlockSpec((bn, kb), lambda i, j: (j, 0)),
                     pl.BlockSpec((1, 1), lambda i, j: (0, 0))]
    kernel = functools.partial(_linear_kernel, table=codebooks.codebook(q.qtype),
                               double_quant=q.double_quant, block_size=q.block_size)
    params = {} if interpret else dict(compiler_params=pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel")))
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((m, n), x2d.dtype),
        grid=(pl.cdiv(m, bm), pl.cdiv(n, bn)), in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)), name="qlora_linear_4bit_tpu",
        **_interpret_arg(interpret), **params)(pair[..., 0], pair[..., 1], *inputs)


def linear_grad_input(dy2d: jax.Array, q: QTensor, interpret: Optional[bool] = None
                      ) -> jax.Array:
    """``dy2d @ W``: ``[M, out] -> [M, in]`` for a 2-D ``[out, in]`` QTensor."""
    if not supported(q):
        return _two_pass(dy2d, q, True, interpret)
    m, n = dy2d.shape
    k = q.logical_shape[1]
    bm, bn = _tiles(m, n)
    if n % bn:  # the reduction runs over N: its tiles must not read past the weight
        bn = n
    inputs, kh, kb = _weight_inputs(q)
    in_specs = [pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
                pl.BlockSpec((bn, kh), lambda i, j: (j, 0)),
                pl.BlockSpec((bn, kb), lambda i, j: (j, 0))]
    if q.double_quant:
        in_specs += [pl.BlockSpec((bn, kb), lambda i, j: (j, 0)),
                     pl.BlockSpec((1, 1), lambda i, j: (0, 0))]
    steps = pl.cdiv(n, bn)
    kernel = functools.partial(_grad_kernel, table=codebooks.codebook(q.qtype),
                               double_quant=q.double_quant, block_size=q.block_size,
                               n_steps=steps)
    half = jax.ShapeDtypeStruct((m, kh), dy2d.dtype)
    params = {} if interpret else dict(compiler_params=pltpu.CompilerParams(
        dimension_semantics=("parallel", "arbitrary")))
    even, odd = pl.pallas_call(
        kernel, out_shape=(half, half), grid=(pl.cdiv(m, bm), steps), in_specs=in_specs,
        out_specs=(pl.BlockSpec((bm, kh), lambda i, j: (i, 0)),
                   pl.BlockSpec((bm, kh), lambda i, j: (i, 0))),
        scratch_shapes=[pltpu.VMEM((bm, kh), jnp.float32), pltpu.VMEM((bm, kh), jnp.float32)],
        name="qlora_linear_grad_4bit_tpu", **_interpret_arg(interpret), **params)(dy2d, *inputs)
    return jnp.stack([even, odd], axis=-1).reshape(m, k)


def _two_pass(a: jax.Array, q: QTensor, transpose: bool, interpret: Optional[bool]
              ) -> jax.Array:
    """Weights the fused kernels do not take: the TPU dequantization, then an XLA matmul."""
    w = dequantize(q, a.dtype, interpret=interpret)
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    y = jnp.dot(a, w if transpose else w.T, precision=precision,
                preferred_element_type=jnp.float32)
    return y.astype(a.dtype)
