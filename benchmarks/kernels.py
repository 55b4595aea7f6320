"""Benchmark: 4-bit dequantization and 4-bit linear kernels against the ceilings and peers.

    python -m benchmarks.kernels --out runs/kernels            # GPU: the full set (anchors' shapes)
    python -m benchmarks.kernels --out /tmp/k --quick          # CPU smoke test (tiny, interpret mode)
    python -m benchmarks.kernels --out runs/k --sweep          # also time tile configurations

Measures, in one run on one device: the device-to-device copy bandwidth and the
bf16 matmul rate (the ceilings), NF4+DQ dequantization (ours = Pallas, XLA =
plain jnp, bitsandbytes when importable) and ``x @ W.T`` / ``dy @ W`` at 1, 16
and 4096 tokens (ours, the bf16 matmul on the same shape, the XLA NF4 path,
bitsandbytes' gemv_4bit and dequantize+matmul). Each result is checked against
the XLA reference before it is timed.

Timing: every case runs inside one jitted program over several copies of its
inputs (together larger than L2, so no copy is served from cache); the program
is dispatched back to back ``n`` times and synchronised once, so host dispatch
overlaps device work; time a call = wall time / (n * copies); the median of 7
such trials is reported. bitsandbytes/torch cases use ``triton.testing.do_bench``
(CUDA events, median) over rotating copies.

Prints one JSON object a measurement and a table at the end; writes
``results.jsonl`` and ``table.txt`` under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

import qlora_jax as qj
from qlora_jax.quant.blockwise import dequantize_xla
from qlora_jax.quant.kernels import gpu

L2_BYTES = 50 * 2**20
ANCHOR_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (8192, 28672)]
RESULTS: list[dict] = []
TRIALS = 7  # timing trials a case (median reported)
TARGET_S = 0.1  # seconds of device work a trial


def emit(**rec: Any) -> None:
    RESULTS.append(rec)
    print(json.dumps(rec), flush=True)


def copies_for(nbytes: int, quick: bool) -> int:
    """Input copies so that one pass over them is at least 3x L2."""
    if quick:
        return 2
    return int(min(8, max(2, math.ceil(3 * L2_BYTES / max(nbytes, 1)))))


def time_jax(fn: Callable, sets: list, quick: bool) -> float:
    """Median seconds of one ``fn(*s)`` over rotating argument sets (see module doc)."""
    run = jax.jit(lambda sets: [fn(*s) for s in sets])
    jax.block_until_ready(run(sets))  # compile + warm-up
    t0 = time.perf_counter()
    jax.block_until_ready(run(sets))
    est = max(time.perf_counter() - t0, 1e-6)
    n = 1 if quick else int(min(200, max(3, math.ceil(TARGET_S / est))))
    trials = []
    for _ in range(TRIALS if not quick else 2):
        t0 = time.perf_counter()
        out = None
        for _ in range(n):
            out = run(sets)
        jax.block_until_ready(out)
        trials.append((time.perf_counter() - t0) / (n * len(sets)))
    return statistics.median(trials)


def time_torch(fns: list) -> float:
    """Median seconds of one call, rotating over ``fns``, with CUDA events (do_bench)."""
    import triton.testing as tt
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(fns)
        fns[state["i"]]()

    return tt.do_bench(call, warmup=50, rep=300, return_mode="median") / 1e3


def rel_err(a: jax.Array, b: jax.Array) -> float:
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def device_info() -> dict:
    d = jax.devices()[0]
    info = dict(device=getattr(d, "device_kind", str(d)), backend=jax.default_backend(),
                jax=jax.__version__, python=platform.python_version(),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    try:
        import torch
        info["torch"] = torch.__version__
        import bitsandbytes
        info["bitsandbytes"] = bitsandbytes.__version__
    except Exception:
        pass
    return info


def torch_ok() -> bool:
    try:
        import torch
        return bool(torch.cuda.is_available())
    except Exception:
        return False


def bnb_mod():
    try:
        import bitsandbytes.functional as F
        return F if torch_ok() else None
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------

def ceilings(quick: bool) -> dict:
    n = 2**20 if quick else 2**28  # uint32 words: 1 GiB on a GPU
    a = jnp.arange(n, dtype=jnp.uint32)
    sec = time_jax(lambda v: v ^ jnp.uint32(1), [(a,)], quick)
    copy = 2 * a.nbytes / sec / 1e9
    emit(what="copy_ceiling", impl="xla", GBps=round(copy, 1), bytes=2 * a.nbytes)
    m = 256 if quick else 8192
    mats = [jax.random.normal(jax.random.PRNGKey(i), (m, m), jnp.bfloat16) for i in range(2)]
    sec = time_jax(lambda u, v: u @ v, [(mats[0], mats[1])], quick)
    tflops = 2 * m**3 / sec / 1e12
    emit(what="matmul_ceiling", impl="xla", shape=[m, m, m], TFLOPs=round(tflops, 1))
    out = dict(copy_GBps=copy, matmul_TFLOPs=tflops)
    if torch_ok() and not quick:
        import torch
        ta = torch.empty(2**30, dtype=torch.uint8, device="cuda")
        tb = torch.empty_like(ta)
        sec = time_torch([lambda: tb.copy_(ta)])
        emit(what="copy_ceiling", impl="torch", GBps=round(2 * ta.numel() / sec / 1e9, 1))
        del ta, tb
        tm = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        sec = time_torch([lambda: tm @ tm])
        emit(what="matmul_ceiling", impl="torch", TFLOPs=round(2 * 8192**3 / sec / 1e12, 1))
    return out


def make_weights(shape: tuple, count: int, seed: int) -> list:
    key = jax.random.PRNGKey(seed)
    ws = []
    for i in range(count):
        w = jax.random.normal(jax.random.fold_in(key, i), shape, jnp.bfloat16)
        ws.append((w, qj.quant.quantize(w, "nf4", block_size=64, double_quant=True)))
    return ws


def bench_dequant(shape: tuple, ceil: dict, quick: bool, configs: Optional[list] = None) -> None:
    n = shape[0] * shape[1]
    nbytes = n // 2 + n // 64 + n * 2  # codes + 8-bit scales read, bf16 written
    ws = make_weights(shape, copies_for(nbytes, quick), 1)
    qs = [(q,) for _, q in ws]
    ref = dequantize_xla(ws[0][1], jnp.bfloat16)
    cases = [("xla", None)] + [("pallas", c) for c in (configs or [gpu.DequantConfig()])]
    for impl, cfg in cases:
        if impl == "xla":
            fn = lambda q: dequantize_xla(q, jnp.bfloat16)
        else:
            fn = lambda q, cfg=cfg: gpu.dequantize(q, jnp.bfloat16, cfg)
        out = jax.jit(fn)(ws[0][1])
        exact = bool(jnp.all(jax.lax.bitcast_convert_type(out, jnp.uint16)
                             == jax.lax.bitcast_convert_type(ref, jnp.uint16)))
        sec = time_jax(fn, qs, quick)
        gbps = nbytes / sec / 1e9
        emit(what="dequantize", impl=impl, shape=list(shape), us=round(sec * 1e6, 2),
             GBps=round(gbps, 1), frac_copy=round(gbps / ceil["copy_GBps"], 3),
             bit_exact_vs_xla=exact, config=None if cfg is None else cfg.__dict__)
    F = bnb_mod()
    if F is not None and configs is None:
        import torch
        tw = [torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
              for _ in range(copies_for(nbytes, quick))]
        tq = [F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
              for w in tw]
        sec = time_torch([lambda a=a, s=s: F.dequantize_4bit(a, s) for a, s in tq])
        gbps = nbytes / sec / 1e9
        emit(what="dequantize", impl="bnb", shape=list(shape), us=round(sec * 1e6, 2),
             GBps=round(gbps, 1), frac_copy=round(gbps / ceil["copy_GBps"], 3))


def bench_linear(shape: tuple, tokens: int, quick: bool, grad: bool,
                 configs: Optional[list] = None) -> None:
    n_out, n_in = shape
    m_in = n_out if grad else n_in  # width of the activation operand
    wbytes = n_out * n_in // 2 + n_out * n_in // 64
    ws = make_weights(shape, copies_for(wbytes + tokens * m_in * 2, quick), 2)
    xs = [jax.random.normal(jax.random.PRNGKey(100 + i), (tokens, m_in), jnp.bfloat16)
          for i in range(len(ws))]
    what = "linear_grad_input" if grad else "linear"
    qref = dequantize_xla(ws[0][1], jnp.float32)
    x0 = xs[0].astype(jnp.float32)
    ref = x0 @ qref if grad else x0 @ qref.T
    ours_fn = gpu.linear_grad_input if grad else gpu.linear
    if configs is None:
        cases = [("bf16", None), ("xla_nf4", None), ("pallas", None)]
    else:
        cases = [("pallas", c) for c in configs]
    for impl, cfg in cases:
        if impl == "bf16":
            fn = (lambda x, w, q: x @ w) if grad else (lambda x, w, q: x @ w.T)
        elif impl == "xla_nf4":
            fn = ((lambda x, w, q: x @ dequantize_xla(q, x.dtype)) if grad
                  else (lambda x, w, q: qj.quant.linear(x, q, impl="xla")))
        else:
            fn = lambda x, w, q, cfg=cfg: ours_fn(x, q, cfg)
        sets = [(x, w, q) for x, (w, q) in zip(xs, ws)]
        try:
            err = rel_err(jax.jit(fn)(*sets[0]), ref) if impl != "bf16" else None
            sec = time_jax(fn, sets, quick)
        except Exception as e:  # a tile config that does not compile: record and go on
            emit(what=what, impl=impl, shape=list(shape), tokens=tokens, error=str(e)[:300],
                 config=None if cfg is None else cfg.__dict__)
            continue
        emit(what=what, impl=impl, shape=list(shape), tokens=tokens, us=round(sec * 1e6, 2),
             rel_err=None if err is None else float(f"{err:.3g}"),
             weight_GBps=round(wbytes / sec / 1e9, 1),
             TFLOPs=round(2 * tokens * n_out * n_in / sec / 1e12, 2),
             config=None if cfg is None else cfg.__dict__)
    F = bnb_mod()
    if F is None or configs is not None:
        return
    import torch
    tw = [torch.randn(*shape, device="cuda", dtype=torch.bfloat16) for _ in range(len(ws))]
    tq = [F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
          for w in tw]
    tx = [torch.randn(tokens, m_in, device="cuda", dtype=torch.bfloat16) for _ in tw]
    if tokens == 1 and not grad:
        fns = [lambda x=x, a=a, s=s: F.gemv_4bit(x, a.t(), state=s)
               for x, (a, s) in zip(tx, tq)]
        emit(what=what, impl="bnb_gemv_4bit", shape=list(shape), tokens=tokens,
             us=round(time_torch(fns) * 1e6, 2))
    if grad:
        fns = [lambda x=x, a=a, s=s: x @ F.dequantize_4bit(a, s) for x, (a, s) in zip(tx, tq)]
    else:
        fns = [lambda x=x, a=a, s=s: x @ F.dequantize_4bit(a, s).t()
               for x, (a, s) in zip(tx, tq)]
    emit(what=what, impl="bnb_dequant_matmul", shape=list(shape), tokens=tokens,
         us=round(time_torch(fns) * 1e6, 2))
    fns = [(lambda x=x, w=w: x @ w) if grad else (lambda x=x, w=w: x @ w.t())
           for x, w in zip(tx, tw)]
    emit(what=what, impl="torch_bf16", shape=list(shape), tokens=tokens,
         us=round(time_torch(fns) * 1e6, 2))


SWEEP_PARTS = ("dequant", "gemv", "mm16", "big", "dequant2", "gemv2", "diag", "lut", "fusedp", "final")


def sweep(part: str, quick: bool, ceil: dict) -> None:
    """Times tile configurations of one kernel family on its target shape."""
    from itertools import product
    shape = (4096, 14336) if not quick else (64, 256)
    cut = (lambda c: c[:2]) if quick else (lambda c: c)
    if part == "dequant":
        dq = [gpu.DequantConfig(elements=e, num_warps=w, lut=l)
              for e, w, l in product((2048, 4096, 8192, 16384), (4, 8), ("gather", "select"))]
        bench_dequant((8192, 28672) if not quick else (64, 256), ceil, quick, configs=cut(dq))
    elif part == "gemv":
        gemv = [gpu.MatmulConfig(bm=None, bn=bn, bk=bk, split=None, num_warps=w, lut=l)
                for bn, bk, w, l in product((16, 32, 64), (128, 256, 512), (4, 8),
                                            ("gather", "select"))]
        bench_linear(shape, 1, quick, grad=False, configs=cut(gemv))
        bench_linear(shape, 1, quick, grad=True, configs=cut(gemv[::2]))
    elif part == "mm16":
        mm16 = [gpu.MatmulConfig(bm=16, bn=bn, bk=bk, num_warps=w, num_stages=s, lut=l)
                for bn, bk, w, s, l in product((32, 64, 128), (64, 128, 256), (4,), (2, 4),
                                               ("gather", "select"))]
        bench_linear(shape, 16, quick, grad=False, configs=cut(mm16))
        bench_linear(shape, 16, quick, grad=True, configs=cut(mm16[::2]))
    elif part == "big":
        big = [gpu.MatmulConfig(bm=bm, bn=bn, bk=bk, split=1, num_warps=w, num_stages=s, lut=l)
               for bm, bn, bk, w, s, l in product((128,), (128, 256), (64, 128), (4, 8), (3,),
                                                  ("gather", "select"))]
        big += [gpu.MatmulConfig(bm=64, bn=128, bk=64, split=1, num_warps=4, num_stages=4),
                gpu.MatmulConfig(bm=128, bn=128, bk=64, split=1, num_warps=8, num_stages=4),
                gpu.MatmulConfig(bm=256, bn=128, bk=64, split=1, num_warps=8, num_stages=3)]
        tokens = 4096 if not quick else 64
        bench_linear(shape, tokens, quick, grad=False, configs=cut(big))
        bench_linear(shape, tokens, quick, grad=True, configs=cut(big))
    elif part == "dequant2":
        dq = [gpu.DequantConfig(elements=e, num_warps=w, lut="select")
              for e, w in product((16384, 32768, 65536), (2, 4, 8))]
        bench_dequant((8192, 28672) if not quick else (64, 256), ceil, quick, configs=cut(dq))
    elif part == "gemv2":
        gemv = [gpu.MatmulConfig(bm=None, bn=bn, bk=bk, split=None, num_warps=w, lut=l)
                for bn, bk, w, l in product((8, 16), (512, 1024), (2, 4), ("gather", "select"))]
        bench_linear(shape, 1, quick, grad=False, configs=cut(gemv))
        bench_linear(shape, 1, quick, grad=True, configs=cut(gemv))
    elif part == "lut":  # codebook lookups against each other (and no lookup)
        dq = [gpu.DequantConfig(num_warps=w, lut=l) for w in (4, 8)
              for l in ("prmt", "select", "diagnostic_no_lut")]
        bench_dequant((8192, 28672) if not quick else (64, 256), ceil, quick, configs=dq)
        gemv = [gpu.MatmulConfig(bm=None, bn=bn, bk=bk, num_warps=w, lut=l)
                for bn, bk, w in ((8, 512, 2), (16, 512, 4), (32, 256, 4), (16, 256, 2))
                for l in ("prmt", "gather")]
        bench_linear(shape, 1, quick, grad=False, configs=gemv)
        bench_linear(shape, 1, quick, grad=True, configs=gemv)
    elif part == "fusedp":  # the fused tensor-core kernel with the byte-permute lookup
        mm = [gpu.MatmulConfig(bm=16, bn=bn, bk=bk, num_warps=4, num_stages=3, lut="prmt")
              for bn, bk in ((32, 128), (64, 128), (64, 256), (128, 128))]
        bench_linear(shape, 16, quick, grad=False, configs=cut(mm))
        bench_linear(shape, 16, quick, grad=True, configs=cut(mm))
        big = [gpu.MatmulConfig(bm=128, bn=128, bk=bk, split=1, num_warps=8, num_stages=3,
                                lut="prmt") for bk in (64, 128)]
        bench_linear(shape, 4096 if not quick else 64, quick, grad=False, configs=cut(big))
    elif part == "final":  # around the defaults, all with the byte-permute lookup
        gemv = [gpu.MatmulConfig(bm=None, bn=bn, bk=bk, num_warps=w, lut="prmt")
                for bn, bk, w in ((8, 512, 2), (8, 512, 1), (4, 1024, 1), (8, 1024, 2),
                                  (4, 512, 1), (8, 256, 1), (16, 256, 2), (32, 128, 4))]
        bench_linear(shape, 1, quick, grad=False, configs=cut(gemv))
        bench_linear(shape, 1, quick, grad=True, configs=cut(gemv))
        mm = [gpu.MatmulConfig(bm=16, bn=bn, bk=bk, num_warps=w, num_stages=st, lut="prmt")
              for bn, bk, w, st in ((64, 256, 4, 3), (64, 256, 2, 3), (64, 512, 4, 3),
                                    (32, 256, 2, 3), (64, 128, 4, 4), (128, 256, 8, 3))]
        bench_linear(shape, 16, quick, grad=False, configs=cut(mm))
        bench_linear(shape, 16, quick, grad=True, configs=cut(mm))
    elif part == "diag":  # the defaults against no-lookup variants, each twice (run spread)
        base = [gpu.DequantConfig(), gpu.DequantConfig(num_warps=8),
                gpu.DequantConfig(lut="diagnostic_no_lut")]
        bench_dequant((8192, 28672) if not quick else (64, 256), ceil, quick, configs=base * 2)
        g = gpu.default_config(1, *shape, False, quick)
        gemv = [g, dataclasses.replace(g, lut="diagnostic_no_lut"), dataclasses.replace(g, bn=16)]
        bench_linear(shape, 1, quick, grad=False, configs=gemv * 2)
    else:
        raise ValueError(f"unknown sweep part {part!r}; expected one of {SWEEP_PARTS}")


def profile(quick: bool) -> None:
    """Runs each kernel a few times at its target shape, for ``ncu`` (no timing here).

    Includes ``diagnostic_no_lut`` variants (codebook lookup replaced by the
    code itself; wrong values) to separate the lookup's cost from the rest.
    """
    ws = make_weights((8192, 28672) if not quick else (64, 256), 1, 3)
    q = ws[0][1]
    for cfg in (gpu.DequantConfig(), gpu.DequantConfig(num_warps=8),
                gpu.DequantConfig(lut="diagnostic_no_lut")):
        f = jax.jit(lambda q, cfg=cfg: gpu.dequantize(q, jnp.bfloat16, cfg))
        for _ in range(3):
            jax.block_until_ready(f(q))
        emit(what="profiled", kernel="dequantize", config=cfg.__dict__)
    ws = make_weights((4096, 14336) if not quick else (64, 256), 1, 4)
    q = ws[0][1]
    x = jax.random.normal(jax.random.PRNGKey(5), (1, q.shape[1]), jnp.bfloat16)
    base = gpu.default_config(1, *q.shape, False, jax.default_backend() == "cpu")
    for cfg in (base, gpu.MatmulConfig(**{**base.__dict__, "lut": "diagnostic_no_lut"})):
        f = jax.jit(lambda x, q, cfg=cfg: gpu.linear(x, q, cfg))
        for _ in range(3):
            jax.block_until_ready(f(x, q))
        emit(what="profiled", kernel="gemv", config=cfg.__dict__)


def table() -> str:
    lines = [f"{'what':18} {'impl':20} {'shape':>13} {'tok':>5} {'us':>10} {'GB/s':>8} "
             f"{'TFLOP/s':>8} {'err':>8}"]
    for r in RESULTS:
        if "shape" not in r or "us" not in r:
            continue
        shape = "x".join(str(s) for s in r["shape"])
        impl = r["impl"]
        if r.get("config"):
            c = r["config"]
            tiles = "x".join(str(c.get(k)) for k in ("bm", "bn", "bk", "elements") if k in c)
            impl = f"{tiles} w{c['num_warps']}s{c['num_stages']}{(c['lut'] or 'default')[0]}{c.get('split') or ''}"
        lines.append(f"{r['what']:18} {impl:20} {shape:>13} {r.get('tokens', ''):>5} "
                     f"{r['us']:>10.2f} {r.get('GBps', r.get('weight_GBps', '')):>8} "
                     f"{r.get('TFLOPs', ''):>8} {str(r.get('rel_err', '')):>8}")
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for results.jsonl and table.txt")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke test)")
    p.add_argument("--sweep", default="", help="time tile configurations instead: comma list "
                   f"of {SWEEP_PARTS} or 'all'")
    p.add_argument("--profile", action="store_true",
                   help="run each kernel a few times for a profiler (ncu), no timing")
    p.add_argument("--lut", default="", help="override the default codebook lookup: "
                   "'DEQUANT,MATMUL' modes, e.g. 'select,gather'")
    p.add_argument("--trials", type=int, default=7, help="timing trials a case (median)")
    p.add_argument("--target-s", type=float, default=0.1, help="device seconds a trial")
    p.add_argument("--only", default="", help="comma list: ceilings,dequant,linear,grad")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    global TRIALS, TARGET_S
    TRIALS, TARGET_S = args.trials, args.target_s
    if args.lut:
        gpu.DEFAULT_LUT["dequant"], gpu.DEFAULT_LUT["matmul"] = args.lut.split(",")
    emit(what="default_lut", **gpu.DEFAULT_LUT)
    emit(what="info", **device_info())
    if args.profile:
        profile(args.quick)
        return
    only = set(filter(None, args.only.split(","))) or {"ceilings", "dequant", "linear", "grad"}
    if args.sweep:
        TRIALS, TARGET_S = min(TRIALS, 5), min(TARGET_S, 0.05)
        ceil = dict(copy_GBps=3000.0, matmul_TFLOPs=750.0)  # the main run measures them
        parts = SWEEP_PARTS if args.sweep == "all" else args.sweep.split(",")
        for part in parts:
            sweep(part, args.quick, ceil)
        write(args.out, "sweep_" + "_".join(parts))
        return
    ceil = ceilings(args.quick)
    shapes = [(64, 256), (96, 192)] if args.quick else ANCHOR_SHAPES
    tokens = (1, 16, 64) if args.quick else (1, 16, 4096)
    if "dequant" in only:
        for shape in shapes:
            bench_dequant(shape, ceil, args.quick)
    for grad in (False, True):
        if ("grad" if grad else "linear") not in only:
            continue
        for shape in shapes:
            for t in tokens:
                bench_linear(shape, t, args.quick, grad)
    write(args.out, "results")


def write(out: str, stem: str) -> None:
    with open(os.path.join(out, stem + ".jsonl"), "w") as f:
        for r in RESULTS:
            f.write(json.dumps(r) + "\n")
    text = table()
    with open(os.path.join(out, stem + "_table.txt"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
