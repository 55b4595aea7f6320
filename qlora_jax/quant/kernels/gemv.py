"""The decoding GEMV: ``x @ W.T`` for one token row, reading W in 4 bits.

A program owns ``rows`` rows of W and walks its share of the reduction axis one quantization
block at a time (64 columns: 32 bytes a row). Nothing is unpacked into a wider tile: the high
and low nibbles of each loaded byte are looked up separately (the byte-permute lookup of
``_decode``) and multiplied by the even and odd entries of x, so the
float32 work a weight is one lookup and one FMA; the block's scale multiplies the block's
partial sums (``rows x 32`` values), not the weights. (x arrives split into its even and odd
entries, two float32 rows, by one small XLA op.) Each loop step first loads ``blocks``
blocks (codes, scales, x) and then computes them, which keeps that many blocks of every row in
flight. The reduction axis is split over programs (``split``) so the GPU fills at decode
shapes; the float32 partial sums ``[split, N]`` are added by XLA.

Numerics: the weights' values are those of ``blockwise.dequantize_xla`` before the cast
(codebook value times the decoded scale, float32); products and sums are float32, in a
different order than the tiled kernels' (same tolerances).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from qlora_jax.quant.kernels import _decode as dec
from qlora_jax.quant.qtensor import QTensor


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """Tiles of the decoding GEMV: ``rows`` of W a program, ``blocks`` quantization blocks a
    row loaded before use each loop step; ``split`` programs along the reduction axis (``None``:
    enough for ~``waves`` programs an SM)."""

    rows: int = 64
    blocks: int = 2
    split: Optional[int] = None
    waves: int = 4
    num_warps: int = 4
    num_stages: int = 1
    lut: Optional[str] = None
    layout: str = "words"   # "words": uint32 loads, 8 codes an asm call; "bytes": uint8 tiles
    bf16_lut: bool = False  # words: the bf16-rounded codebook (2 byte planes, not 4)


def _kernel(*refs, n_rows, n_cols, block_size, rows, blocks, tps, q_static, lut, exact,
            mask_rows, mask_steps, layered, aliased):
    from qlora_jax.quant.kernels import gpu  # the shared ref helpers (same layer)

    nq = dec.num_qrefs(q_static[1])
    x_ref = refs[0]
    qrefs = gpu._qrefs(list(refs[1:1 + nq]), q_static, lut, exact)
    row_base = gpu._layer_base(list(refs), nq, qrefs, q_static, n_rows, layered)
    out_ref = refs[-1]
    i, s = pl.program_id(0), pl.program_id(1)
    n0 = i * rows
    row_idx = n0 + jnp.arange(rows, dtype=jnp.int32)[:, None]
    row_ok = row_idx < n_rows
    half = block_size // 2
    per_row = n_cols // block_size  # blocks a row

    def step(t, acc):
        b0 = (s * tps + t) * blocks
        loaded = []
        for u in range(blocks):  # all loads of the step first, then the math
            b = b0 + u
            ok = (row_ok & (b < per_row)) if (mask_rows or mask_steps) else None
            x_ok = (b < per_row) if mask_steps else None
            packed = dec.load(qrefs.packed_ref.at[pl.ds(row_base + n0, rows),
                                                  pl.ds(b * half, half)], mask=ok, other=0)
            raw = dec.load(qrefs.absmax_ref.at[pl.ds(row_base + n0, rows), pl.ds(b, 1)],
                           mask=ok, other=0)
            xe = dec.load(x_ref.at[pl.ds(0, 1), pl.ds(b * half, half)], mask=x_ok, other=0)
            xo = dec.load(x_ref.at[pl.ds(1, 1), pl.ds(b * half, half)], mask=x_ok, other=0)
            loaded.append((b, packed, raw, xe, xo))
        for b, packed, raw, xe, xo in loaded:
            hi = dec.lookup_nibble(packed, qrefs.table_ref, qrefs.table, lut, exact, "hi")
            lo = dec.lookup_nibble(packed, qrefs.table_ref, qrefs.table, lut, exact, "lo")
            part = hi * xe + lo * xo
            absmax = dec.decode_absmax(raw, row_idx * per_row + b, qrefs)
            if mask_rows or mask_steps:
                absmax = jnp.where(row_ok & (b < per_row), absmax, jnp.float32(0))
            acc = acc + part * absmax
        return acc

    acc = jax.lax.fori_loop(0, tps, step, jnp.zeros((rows, half), jnp.float32))
    n_idx = n0 + jnp.arange(rows, dtype=jnp.int32)
    dec.store(out_ref.at[s, pl.ds(n0, rows)], jnp.sum(acc, axis=1),
              mask=(n_idx < n_rows) if mask_rows else None)


def _words_kernel(*refs, n_rows, n_cols, block_size, rows, blocks, tps, q_static, exact, bf16,
                  mask_rows, mask_steps, layered, aliased):
    """As ``_kernel``, reading the codes as uint32 words (``[rows, block_size // 8]`` a block)
    and x as 8 rows (``x[j::8]``): one asm call turns a word into its 8 values."""
    from qlora_jax.quant.kernels import gpu

    nq = dec.num_qrefs(q_static[1])
    x_ref = refs[0]
    qrefs = gpu._qrefs(list(refs[1:1 + nq]), q_static, "select", exact)
    row_base = gpu._layer_base(list(refs), nq, qrefs, q_static, n_rows, layered)
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
            # x[8w + j] for the block's words w: gathers from the (cached) row of x; a block
            # past the row's end (masked steps) reads column 0 and its scale is zeroed.
            base = jnp.where(b < per_row, b * block_size, 0) if mask_steps else b * block_size
            cols = base + 8 * jnp.arange(wpb, dtype=jnp.int32)
            xs = [x_ref[cols + j].astype(jnp.float32)[None, :] for j in range(8)]
            loaded.append((b, words, raw, xs))
        for b, words, raw, xs in loaded:
            vals = dec.lookup_words(words, qrefs.table, exact, bf16)
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


def env_config() -> GemvConfig:
    """The default tiles, or ``QLORA_JAX_GEMV_CONFIG`` (``rows=64,blocks=4,...``: a tuning
    run's choice, for benchmarks)."""
    spec = os.environ.get("QLORA_JAX_GEMV_CONFIG", "").strip()
    if not spec:
        return GemvConfig()
    fields = {f.name: f.type for f in dataclasses.fields(GemvConfig)}
    kw: dict = {}
    for item in spec.split(","):
        k, _, v = item.partition("=")
        if k not in fields:
            raise ValueError(f"QLORA_JAX_GEMV_CONFIG: unknown field {k!r}")
        kw[k] = (v == "True") if v in ("True", "False") else (int(v) if v.isdigit() else v)
    return GemvConfig(**kw)


def _split(config: GemvConfig, programs: int, steps: int, interpret: bool) -> int:
    if config.split is not None:
        return max(1, min(config.split, steps))
    if interpret:
        return 1
    from qlora_jax.quant.kernels import gpu

    want = -(-config.waves * gpu._num_sms() // max(programs, 1))
    return max(1, min(want, steps, 64))


def gemv_4bit(x: jax.Array, q: QTensor, config: GemvConfig = GemvConfig(),
              out: Optional[jax.Array] = None, interpret: Optional[bool] = None,
              layer: Optional[jax.Array] = None) -> jax.Array:
    """``x @ W.T`` for ``x`` ``[1, K]`` and a block-aligned ``[N, K]`` QTensor (with ``layer``,
    layer ``layer`` of a stack along one axis, read in place): ``[1, N]`` in ``x.dtype``.

    ``out`` (tests): an aliased ``[split, N]`` float32 buffer the kernel must overwrite.
    """
    from qlora_jax.quant.kernels import gpu

    interpret = gpu._interpret() if interpret is None else interpret
    n_rows, n_cols = q.logical_shape
    if x.shape != (1, n_cols):
        raise ValueError(f"the GEMV takes x of shape (1, {n_cols}), got {x.shape}")
    bs = q.block_size
    if n_cols % bs or bs % 8:
        raise ValueError(f"rows of {n_cols} are not whole blocks of {bs} (a multiple of 8)")
    rows, blocks = config.rows, config.blocks
    programs = pl.cdiv(n_rows, rows)
    steps = pl.cdiv(n_cols // bs, blocks)  # loop steps a row, all splits together
    split = _split(config, programs, steps, interpret)
    tps = pl.cdiv(steps, split)
    split = pl.cdiv(steps, tps)
    out_shape = jax.ShapeDtypeStruct((split, n_rows), jnp.float32)
    qin = gpu._weight_2d(q)
    if layer is not None:
        qin.append(jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)))
    common = dict(n_rows=n_rows, n_cols=n_cols, block_size=bs, rows=rows, blocks=blocks,
                  tps=tps, q_static=gpu._q_static(q), exact=not interpret,
                  mask_rows=n_rows % rows != 0,
                  mask_steps=(n_cols // bs) != split * tps * blocks, layered=layer is not None,
                  aliased=out is not None)
    if config.layout == "words":
        # The codes as uint32 words and x as a flat row: free bitcasts and reshapes.
        packed = qin[0]
        qin[0] = jax.lax.bitcast_convert_type(
            packed.reshape(packed.shape[0], packed.shape[1] // 4, 4), jnp.uint32)
        xs = x.reshape(n_cols)
        kernel = functools.partial(_words_kernel, bf16=config.bf16_lut, **common)
    else:
        # x's even and odd entries as two float32 rows (the high and low nibbles' inputs).
        xs = x.astype(jnp.float32).reshape(n_cols // 2, 2).T
        kernel = functools.partial(_kernel, lut=config.lut or gpu.DEFAULT_LUT["matmul"],
                                   **common)
    inputs, aliases = gpu._with_out([xs] + qin, out_shape, out)
    part = pl.pallas_call(kernel, out_shape=out_shape, grid=(programs, split),
                          input_output_aliases=aliases, name="qlora_gemv_rows_4bit",
                          **gpu._params(config.num_warps, config.num_stages, interpret)
                          )(*inputs)
    return part.sum(axis=0, dtype=jnp.float32).astype(x.dtype)[None, :]
