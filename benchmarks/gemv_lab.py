"""Decode-shape 4-bit kernels on a GPU: the row GEMV's tiles against the tiled GEMV, and the
fused small-M kernel against the two-pass path at 16-64 tokens.

    python -m benchmarks.gemv_lab [--quick] [--out DIR]

One JSON line a case (``what``, ``impl``, ``shape``, ``tokens``, ``us``, ``weight_GBps``,
``rel_err`` against a float32 reference, ``config``), also appended to ``DIR/gemv_lab.jsonl``.
Timing as in ``benchmarks.kernels`` (rotating weight copies larger than L2, medians).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp

from benchmarks import kernels as kb
from qlora_jax.quant.blockwise import dequantize_xla
from qlora_jax.quant.kernels import gpu
from qlora_jax.quant.kernels.gemv import GemvConfig

SHAPES = [(4096, 14336), (14336, 4096), (4096, 4096), (1024, 4096)]


def case(shape: tuple, tokens: int, impl: str, fn: Any, ws: list, xs: list, ref: jax.Array,
         quick: bool, config: Optional[Any] = None, bf16: bool = False) -> Optional[float]:
    """One timed case; ``bf16``: ``fn`` takes the bfloat16 weight (its bytes are counted)."""
    n_out, n_in = shape
    wbytes = n_out * n_in * 2 if bf16 else n_out * n_in // 2 + n_out * n_in // 64
    sets = [(x, w if bf16 else q) for x, (w, q) in zip(xs, ws)]
    rec = dict(what="linear", impl=impl, shape=list(shape), tokens=tokens,
               config=None if config is None else dataclasses.asdict(config))
    try:
        err = kb.rel_err(jax.jit(fn)(*sets[0]), ref)
        sec = kb.time_jax(fn, sets, quick)
    except Exception as e:  # a config that does not compile: record it and go on
        kb.emit(**rec, error=str(e)[:300])
        return None
    kb.emit(**rec, us=round(sec * 1e6, 2), weight_GBps=round(wbytes / sec / 1e9, 1),
            rel_err=float(f"{err:.3g}"))
    return sec


def inputs(shape: tuple, tokens: int, quick: bool) -> tuple:
    n_out, n_in = shape
    wbytes = n_out * n_in // 2 + n_out * n_in // 64
    ws = kb.make_weights(shape, kb.copies_for(wbytes, quick), 2)
    xs = [jax.random.normal(jax.random.PRNGKey(100 + i), (tokens, n_in), jnp.bfloat16)
          for i in range(len(ws))]
    ref = xs[0].astype(jnp.float32) @ dequantize_xla(ws[0][1], jnp.float32).T
    return ws, xs, ref


def gemv_sweep(quick: bool, out: str) -> None:
    """The row GEMV's tiles on the first shape, then the best four of each codebook precision on
    the others; writes the best config of each (``best_gemv_f32.txt``, ``best_gemv_bf16.txt``:
    ``field=value,...``, for ``QLORA_JAX_GEMV_CONFIG``)."""
    tiled = gpu.default_config(1, 0, 0, False, False)
    grid = [GemvConfig(rows=r, blocks=b, num_warps=w, num_stages=st, waves=16, bf16_lut=h)
            for h in (False, True) for r in (64, 128, 256) for b in (2, 4) for w in (4, 8)
            for st in (1, 3)]
    if quick:
        grid = grid[:2] + grid[-2:]
    best: dict = {}
    for shape in SHAPES:
        ws, xs, ref = inputs(shape, 1, quick)
        case(shape, 1, "gemv_tiles", lambda x, q: gpu.linear(x, q, tiled), ws, xs, ref, quick,
             tiled)
        case(shape, 1, "bf16_xla", lambda x, w: x @ w.T, ws, xs, ref, quick, bf16=True)
        if shape == SHAPES[0]:
            configs = grid
        else:
            configs = [c for h in (False, True) for c in sorted(
                (c for c in best if c.bf16_lut == h), key=best.get)[:3]]
        for c in configs:
            sec = case(shape, 1, "gemv_rows", lambda x, q, c=c: gpu.linear(x, q, c), ws, xs,
                       ref, quick, c)
            if shape == SHAPES[0] and sec is not None:
                best[c] = sec
        if shape == SHAPES[0]:
            for h in (False, True):
                c0 = min((c for c in best if c.bf16_lut == h), key=best.get, default=None)
                if c0 is None:
                    continue
                for waves in (8, 32):
                    c = dataclasses.replace(c0, waves=waves)
                    sec = case(shape, 1, "gemv_rows", lambda x, q, c=c: gpu.linear(x, q, c), ws,
                               xs, ref, quick, c)
                    if sec is not None:
                        best[c] = sec
    os.makedirs(out, exist_ok=True)
    for h, name in ((False, "f32"), (True, "bf16")):
        c0 = min((c for c in best if c.bf16_lut == h), key=best.get, default=None)
        if c0 is not None:
            with open(os.path.join(out, f"best_gemv_{name}.txt"), "w") as f:
                f.write(",".join(f"{k}={v}" for k, v in dataclasses.asdict(c0).items()
                                 if v is not None))


def x_modes(quick: bool) -> None:
    """The ways a word's 8 values meet x (``GemvConfig.x_mode``), bf16 codebook: tiles on the
    first shape, then the best two of each mode on the others."""
    from qlora_jax.quant.kernels.gemv import X_MODES
    grid = [GemvConfig(rows=r, blocks=b, bf16_lut=True, x_mode=m)
            for m in X_MODES for r in (64, 128) for b in (2, 4)]
    if quick:
        grid = [c for c in grid if c.rows == 64 and c.blocks == 2]
    best: dict = {}
    for shape in SHAPES:
        ws, xs, ref = inputs(shape, 1, quick)
        configs = grid if shape == SHAPES[0] else [
            c for m in X_MODES for c in sorted((c for c in best if c.x_mode == m),
                                               key=best.get)[:2]]
        for c in configs:
            sec = case(shape, 1, f"gemv_rows_{c.x_mode}", lambda x, q, c=c: gpu.linear(x, q, c),
                       ws, xs, ref, quick, c)
            if shape == SHAPES[0] and sec is not None:
                best[c] = sec


def small_m(quick: bool) -> None:
    from qlora_jax.quant.kernels.gpu import MatmulConfig
    for shape in SHAPES[:2]:
        for tokens in (16, 32, 64):
            ws, xs, ref = inputs(shape, tokens, quick)
            case(shape, tokens, "two_pass", lambda x, q: gpu._two_pass(x, q, False, None), ws,
                 xs, ref, quick)
            for c in (MatmulConfig(bm=16, bn=64, bk=256, num_warps=4, num_stages=3),
                      MatmulConfig(bm=32, bn=64, bk=256, num_warps=4, num_stages=3),
                      MatmulConfig(bm=64, bn=64, bk=128, num_warps=4, num_stages=3),
                      MatmulConfig(bm=32, bn=128, bk=128, num_warps=8, num_stages=3),
                      MatmulConfig(bm=64, bn=128, bk=64, num_warps=8, num_stages=3)):
                if c.bm > 2 * tokens:
                    continue
                case(shape, tokens, "fused", lambda x, q, c=c: gpu.linear(x, q, c), ws, xs,
                     ref, quick, c)


def small_m_lut(quick: bool) -> None:
    """8 and 32 tokens (decoding batches): the tiled kernel's default tiles against the same
    tiles with 2 pipeline stages (4 programs an SM instead of 3), with the bf16 codebook
    (``lut="prmt_bf16"``: ~15% fewer instructions a weight in ``benchmarks.sass_lab``), and with
    both."""
    for shape in SHAPES[:2]:
        for tokens in (8, 32):
            ws, xs, ref = inputs(shape, tokens, quick)
            base = gpu.default_config(tokens, *shape, False, False)
            for c in (base, dataclasses.replace(base, num_stages=2),
                      dataclasses.replace(base, lut="prmt_bf16"),
                      dataclasses.replace(base, lut="prmt_bf16", num_stages=2)):
                case(shape, tokens, "fused", lambda x, q, c=c: gpu.linear(x, q, c), ws, xs,
                     ref, quick, c)


def ptx(quick: bool) -> None:
    """Compiles and runs each GEMV variant once on the first shape (run it under
    ``XLA_FLAGS=--xla_dump_to=DIR`` to keep the kernels' PTX)."""
    ws, xs, _ = inputs(SHAPES[0], 1, True)
    for c in (GemvConfig(bf16_lut=False), GemvConfig(bf16_lut=True)):
        jax.block_until_ready(jax.jit(lambda x, q, c=c: gpu.linear(x, q, c))(xs[0], ws[0][1]))


def main(argv: Optional[list] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--part", action="append",
                   choices=("gemv", "x_modes", "small_m", "small_m_lut", "ptx"))
    p.add_argument("--out", default="benchmarks/out")
    args = p.parse_args(argv)
    parts = args.part or ["gemv", "small_m"]
    if "gemv" in parts:
        gemv_sweep(args.quick, args.out)
    if "x_modes" in parts:
        x_modes(args.quick)
    if "small_m" in parts:
        small_m(args.quick)
    if "small_m_lut" in parts:
        small_m_lut(args.quick)
    if "ptx" in parts:
        ptx(args.quick)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gemv_lab.jsonl"), "a") as f:
        for rec in kb.RESULTS:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
