"""One GEMV launch for several 4-bit weights that read the same input row (decoding).

At one token a decoder layer runs q, k and v (and gate, up) on the same normed input: separate
GEMV launches each fill the GPU only partly (k and v are 4x narrower than q) and pay a launch
each. ``gemv_4bit_multi`` runs them as one ``pallas_call``: the grid's output tiles are the
weights' row tiles laid end to end, each program decodes the tile of its own weight (a static
branch a weight), and the results come back split per weight::

    q, k, v = gemv_4bit_multi(x, [view_q, view_k, view_v])     # x [1, D] -> [1, n_q], ...

Weights are 2-D QTensors ``[N_j, K]`` or LayerViews (a layer of a stack, read in
place), all with the same input width K. The per-weight tile is that of ``kernels.gpu``'s GEMV
(same decode, same accumulation order), so each output equals the separate call's.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from qlora_jax.quant.kernels import _decode as dec
from qlora_jax.quant.kernels import gpu
from qlora_jax.quant.layer_view import LayerView
from qlora_jax.quant.qtensor import QTensor

Weight = Union[QTensor, LayerView]


@dataclasses.dataclass(frozen=True)
class _Part:
    """Static facts of one weight in the fused grid: its rows, its first output tile and
    output column, and whether a layer index ref follows its refs."""

    n_rows: int
    block_size: int
    q_static: tuple
    layered: bool
    tile0: int
    tiles: int
    out0: int


def _kernel(*refs, parts, n_cols, bn, bk, tps, lut, exact, masked):
    v_ref, out_ref = refs[0], refs[-1]
    i, s = pl.program_id(0), pl.program_id(1)
    pos = 1
    for part in parts:
        nq = dec.num_qrefs(part.q_static[1])
        wrefs = list(refs[pos:pos + nq])
        pos += nq
        layer_ref = None
        if part.layered:
            layer_ref = refs[pos]
            pos += 1

        @pl.when((i >= part.tile0) & (i < part.tile0 + part.tiles))
        def _(part=part, wrefs=wrefs, layer_ref=layer_ref):
            qrefs = gpu._qrefs(wrefs, part.q_static, lut, exact)
            row_base = 0
            if layer_ref is not None:
                layer = layer_ref[0]
                qrefs.nested_base, qrefs.offset_index = layer * part.q_static[3], layer
                row_base = layer * part.n_rows
            n0 = (i - part.tile0) * bn

            def step(t, acc):
                k0 = (s * tps + t) * bk
                idx = k0 + jnp.arange(bk, dtype=jnp.int32)
                v = dec.load(v_ref.at[pl.ds(0, 1), pl.ds(k0, bk)],
                             mask=(idx[None, :] < n_cols) if masked else None,
                             other=0).reshape(bk)
                w = dec.weight_tile(qrefs, n0, k0, bn=bn, bk=bk, n_rows=part.n_rows,
                                    n_cols=n_cols, block_size=part.block_size, masked=masked,
                                    row_base=row_base)
                return acc + w * v.astype(jnp.float32)[None, :]

            acc = jax.lax.fori_loop(0, tps, step, jnp.zeros((bn, bk), jnp.float32))
            n_idx = n0 + jnp.arange(bn, dtype=jnp.int32)
            dec.store(out_ref.at[s, pl.ds(part.out0 + n0, bn)], jnp.sum(acc, axis=1),
                      mask=(n_idx < part.n_rows) if masked else None)


def fusable(weights: Sequence[Any]) -> bool:
    """True when ``gemv_4bit_multi`` takes these weights: two or more aligned 2-D QTensors or
    LayerViews (of one-axis stacks that fit int32 offsets) with one input width."""
    if len(weights) < 2:
        return False
    widths = set()
    for w in weights:
        if isinstance(w, LayerView):
            if not (gpu.aligned(w.stacked, layered=True) and w.fits_int32()):
                return False
        elif not (isinstance(w, QTensor) and gpu.aligned(w)):
            return False
        widths.add(w.logical_shape[-1])
    return len(widths) == 1


def gemv_4bit_multi(a: jax.Array, weights: Sequence[Weight],
                    config: Optional[gpu.MatmulConfig] = None,
                    interpret: Optional[bool] = None) -> list[jax.Array]:
    """``[a @ W_j.T for W_j in weights]`` for one row ``a`` ``[1, K]`` in one kernel launch.

    Args:
      a: the input row ``[1, K]``.
      weights: 2-D QTensors ``[N_j, K]`` or LayerViews (see ``fusable``).
      config: the GEMV tile (``bm=None``); default: ``gpu.default_config`` of the widest weight.
      interpret: run the Pallas interpreter (default: off a GPU).

    Returns:
      ``[1, N_j]`` a weight, in ``a``'s dtype.
    """
    if a.ndim != 2 or a.shape[0] != 1:
        raise ValueError(f"gemv_4bit_multi takes one row [1, K], got {a.shape}")
    if not fusable(weights):
        raise ValueError("gemv_4bit_multi needs two or more aligned 4-bit weights (QTensor or "
                         "LayerView) with one input width")
    interpret = gpu._interpret() if interpret is None else interpret
    n_cols = weights[0].logical_shape[-1]
    if a.shape[1] != n_cols:
        raise ValueError(f"input width {a.shape[1]} != the weights' {n_cols}")
    widest = max(w.logical_shape[0] for w in weights)
    config = config or gpu.default_config(1, widest, n_cols, False, interpret)
    if config.bm is not None:
        raise ValueError(f"gemv_4bit_multi takes a GEMV tile (bm=None), got {config}")
    bn, bk = config.bn, config.bk
    parts, inputs, tile0, out0 = [], [a], 0, 0
    for w in weights:
        q = w.stacked if isinstance(w, LayerView) else w
        if bk % q.block_size and q.block_size % bk:
            raise ValueError(f"bk={bk} and block_size={q.block_size} must divide one another")
        n_rows = w.logical_shape[0]
        tiles = pl.cdiv(n_rows, bn)
        layered = isinstance(w, LayerView)
        parts.append(_Part(n_rows, q.block_size, gpu._q_static(q), layered, tile0, tiles, out0))
        inputs += gpu._weight_2d(q)
        if layered:
            inputs.append(jnp.reshape(jnp.asarray(w.index, jnp.int32), (1,)))
        tile0 += tiles
        out0 += n_rows
    red_tiles = pl.cdiv(n_cols, bk)
    split = gpu._split(config, tile0, red_tiles, interpret)
    tps = pl.cdiv(red_tiles, split)
    split = pl.cdiv(red_tiles, tps)
    masked = (any(p.n_rows % bn for p in parts) or n_cols % bk != 0 or red_tiles % tps != 0)
    kernel = functools.partial(_kernel, parts=tuple(parts), n_cols=n_cols, bn=bn, bk=bk, tps=tps,
                               lut=config.lut or gpu.DEFAULT_LUT["matmul"], exact=not interpret,
                               masked=masked)
    out = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((split, out0), jnp.float32),
                         grid=(tile0, split), name="qlora_gemv_4bit_multi",
                         **gpu._params(config.num_warps, config.num_stages, interpret))(*inputs)
    y = out.sum(axis=0, dtype=jnp.float32).astype(a.dtype)[None, :]
    return [y[:, p.out0:p.out0 + p.n_rows] for p in parts]
