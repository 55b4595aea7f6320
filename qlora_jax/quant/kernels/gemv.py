"""The decoding GEMV: ``x @ W.T`` for one token row, reading W in 4 bits.

A program owns ``rows`` rows of W and walks its share of the reduction axis one quantization
block at a time. The codes are read as uint32 words (8 codes, a free bitcast of the packed
bytes) and one inline-asm call turns a word into its 8 codebook values (byte permutes, see
``_decode.word_lookup_ptx``): no byte is unpacked into a wider tile and no table is read from
memory. Value ``j`` of every word multiplies ``x[8w + j]``: gathered from the row of x (which
stays in cache), or, on large weights, the 8 values joined back into column order against one
contiguous tile of x. The block's scale multiplies the block's partial sums. Each loop step
first loads ``blocks`` blocks of every row and then computes them, which keeps that many
blocks in flight. The reduction axis is split over programs (``split``) so the GPU fills at
decode shapes; XLA adds the float32 partial sums ``[split, N]``.

Numerics: float32 products and sums. With ``bf16_lut`` the codebook is rounded to bfloat16
before the scale multiplies it (two byte planes to look up instead of four: ~20% faster); the
default uses it for bfloat16 inputs, whose dequantized weights are rounded to bfloat16 anyway
(2**-9 relative, the same size), and the exact float32 codebook otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from qlora_jax.quant.kernels import _call
from qlora_jax.quant.kernels import _decode as dec
from qlora_jax.quant.qtensor import QTensor


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """Tiles of the decoding GEMV: ``rows`` of W a program, ``blocks`` quantization blocks a row
    loaded before use each loop step, ``split`` programs along the reduction axis (``None``:
    enough for ~``waves`` programs an SM). ``bf16_lut``: look values up in the bf16-rounded
    codebook (``None``: for bfloat16 inputs). ``x_mode``: how value ``j`` of word ``w`` meets
    ``x[8w + j]``: ``"gather"`` (8 strided loads of x a block) or ``"join"`` (the 8 values
    joined into ``[rows, words, 8]`` against one contiguous ``[words, 8]`` tile of x)."""

    rows: int = 128
    blocks: int = 4
    split: Optional[int] = None
    waves: int = 16
    num_warps: int = 4
    num_stages: int = 3
    bf16_lut: Optional[bool] = None
    x_mode: str = "gather"


X_MODES = ("gather", "join")


def default_config(n_rows: int, n_cols: int = 0) -> GemvConfig:
    """Tiles measured best on an H200 (benchmarks/RESULTS.md, sessions 6 and 7): 128 rows a
    program for wide weights, fewer for narrow ones (k/v projections) so the grid still fills
    the GPU; x met as a contiguous tile (``"join"``) on the MLP's large weights (>= 2**25
    elements: 7% faster there, slower on the 4096 x 4096 ones). ``QLORA_JAX_GEMV_CONFIG``
    (``rows=64,blocks=2,...``) overrides them, for tuning runs."""
    return _call.env_overrides(
        GemvConfig(rows=128 if n_rows >= 4096 else 64 if n_rows >= 2048 else 32,
                   x_mode="join" if n_rows * n_cols >= 1 << 25 else "gather"),
        "QLORA_JAX_GEMV_CONFIG")


def _x_columns(x_ref, b, wpb, per_row, mask_steps, x_mode):
    """The x values a block's words multiply: for ``"gather"`` 8 float32 ``[1, wpb]`` arrays
    (column j of every word), for ``"join"`` one ``[1, wpb, 8]`` array. A block past the row's
    end (masked steps) reads block 0 (its scale is zeroed)."""
    blk = jnp.where(b < per_row, b, 0) if mask_steps else b
    if x_mode == "gather":  # x_ref: [K]
        cols = blk * (8 * wpb) + 8 * jnp.arange(wpb, dtype=jnp.int32)
        return [x_ref[cols + j].astype(jnp.float32)[None, :] for j in range(8)]
    return x_ref[pl.ds(blk * wpb, wpb), :].astype(jnp.float32)[None]  # x_ref: [K / 8, 8]


def _kernel(*refs, n_rows, n_cols, block_size, rows, blocks, tps, q_static, exact, bf16,
            mask_rows, mask_steps, layered, aliased, x_mode):
    nq = dec.num_qrefs(q_static[1])
    x_ref = refs[0]
    qrefs = _call.qrefs(list(refs[1:1 + nq]), q_static, "select", exact)
    row_base = _call.layer_base(list(refs), nq, qrefs, q_static, n_rows, layered)
    out_ref = refs[-1]
    i, s = pl.program_id(0), pl.program_id(1)
    n0 = i * rows
    row_idx = n0 + jnp.arange(rows, dtype=jnp.int32)[:, None]
    row_ok = row_idx < n_rows
    wpb = block_size // 8  # words a block
    per_row = n_cols // block_size
    masked = mask_rows or mask_steps

    def step(t, acc):
        b0 = (s * tps + t) * blocks
        loaded = []
        for u in range(blocks):  # all loads of the step first, then the math
            b = b0 + u
            ok = (row_ok & (b < per_row)) if masked else None
            words = dec.load(qrefs.packed_ref.at[pl.ds(row_base + n0, rows), pl.ds(b * wpb, wpb)],
                             mask=ok, other=0)
            raw = dec.load(qrefs.absmax_ref.at[pl.ds(row_base + n0, rows), pl.ds(b, 1)],
                           mask=ok, other=0)
            xs = _x_columns(x_ref, b, wpb, per_row, mask_steps, x_mode)
            loaded.append((b, words, raw, xs))
        for b, words, raw, xs in loaded:
            vals = dec.lookup_words(words, qrefs.table, exact, bf16)
            if x_mode == "join":
                part = jnp.sum(dec.join8(vals) * xs, axis=-1)
            else:
                part = vals[0] * xs[0]
                for j in range(1, 8):
                    part = part + vals[j] * xs[j]
            absmax = dec.decode_absmax(raw, row_idx * per_row + b, qrefs)
            if masked:
                absmax = jnp.where(row_ok & (b < per_row), absmax, jnp.float32(0))
            acc = acc + part * absmax
        return acc

    acc = jax.lax.fori_loop(0, tps, step, jnp.zeros((rows, wpb), jnp.float32))
    n_idx = n0 + jnp.arange(rows, dtype=jnp.int32)
    dec.store(out_ref.at[s, pl.ds(n0, rows)], jnp.sum(acc, axis=1),
              mask=(n_idx < n_rows) if mask_rows else None)


def _split(config: GemvConfig, programs: int, steps: int, interpret: bool) -> int:
    return _call.split_count(config.split, config.waves, 64, programs, steps, interpret)


def gemv_4bit(x: jax.Array, q: QTensor, config: Optional[GemvConfig] = None,
              out: Optional[jax.Array] = None, interpret: Optional[bool] = None,
              layer: Optional[jax.Array] = None) -> jax.Array:
    """``x @ W.T`` for ``x`` ``[1, K]`` and a block-aligned ``[N, K]`` QTensor (with ``layer``,
    layer ``layer`` of a stack along one axis, read in place): ``[1, N]`` in ``x.dtype``.

    ``out`` (tests): an aliased ``[split, N]`` float32 buffer the kernel must overwrite.
    """
    interpret = _call.interpret() if interpret is None else interpret
    n_rows, n_cols = q.logical_shape
    if x.shape != (1, n_cols):
        raise ValueError(f"the GEMV takes x of shape (1, {n_cols}), got {x.shape}")
    bs = q.block_size
    if n_cols % bs or bs % 8:
        raise ValueError(f"rows of {n_cols} are not whole blocks of {bs} (a multiple of 8)")
    config = config or default_config(n_rows, n_cols)
    if config.x_mode not in X_MODES:
        raise ValueError(f"unknown x_mode {config.x_mode!r}; expected one of {X_MODES}")
    bf16 = x.dtype == jnp.bfloat16 if config.bf16_lut is None else config.bf16_lut
    rows, blocks = config.rows, config.blocks
    programs = pl.cdiv(n_rows, rows)
    steps = pl.cdiv(n_cols // bs, blocks)  # loop steps a row, all splits together
    split = _split(config, programs, steps, interpret)
    tps = pl.cdiv(steps, split)
    split = pl.cdiv(steps, tps)
    out_shape = jax.ShapeDtypeStruct((split, n_rows), jnp.float32)
    qin = _call.weight_2d(q)
    # The codes as uint32 words, x as a flat row (gather) or [K / 8, 8] (join): free bitcasts
    # and reshapes.
    qin[0] = _call.as_words(qin[0])
    if layer is not None:
        qin.append(jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)))
    x_in = x.reshape(n_cols) if config.x_mode == "gather" else x.reshape(n_cols // 8, 8)
    inputs, aliases = _call.with_out([x_in] + qin, out_shape, out)
    kernel = functools.partial(
        _kernel, n_rows=n_rows, n_cols=n_cols, block_size=bs, rows=rows, blocks=blocks,
        tps=tps, q_static=_call.q_static(q), exact=not interpret, bf16=bf16,
        mask_rows=n_rows % rows != 0, mask_steps=(n_cols // bs) != split * tps * blocks,
        layered=layer is not None, aliased=out is not None, x_mode=config.x_mode)
    part = pl.pallas_call(kernel, out_shape=out_shape, grid=(programs, split),
                          input_output_aliases=aliases, name="qlora_gemv_rows_4bit",
                          **_call.params(config.num_warps, config.num_stages, interpret)
                          )(*inputs)
    return part.sum(axis=0, dtype=jnp.float32).astype(x.dtype)[None, :]
