"""Benchmark: causal attention over packed rows (segment ids) against unpacked cuDNN attention.

    python -m benchmarks.attention --out runs/attention            # GPU (llama-8b heads)
    python -m benchmarks.attention --out /tmp/att --quick          # CPU smoke test (tiny)
    python -m benchmarks.attention --out runs/attention --sweep    # also other kernel tiles

Cases, forward and forward+backward, at T = 2048 and 8192 tokens a row, llama-8b head shapes
(32 query heads, 8 key/value heads, head dim 128, bf16):

- ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn", is_causal=True)`` on one
  unpacked row (what a dense, unpacked training step runs);
- ``pallas_segments``: the fused Pallas flash-attention kernel with segment ids
  (``qlora_jax.models.segments.fused_segment_attention``) on one packed row of examples of
  random lengths (median ~250 tokens);
- ``xla_segments``: XLA attention with the ``[B, 1, T, T]`` segment mask (the CPU path), at
  T = 2048 only (the mask and scores of T = 8192 are large).

Each case is checked against the XLA reference before it is timed (forward output; max
relative difference printed). Timing: jitted, run back to back ``n`` times and synchronised
once; median of 5 trials. Prints one JSON object a measurement; writes ``results.jsonl`` under
``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.models import segments

TRIALS = 5


def _time(fn: Callable, args: tuple, target_s: float = 0.2) -> float:
    """Median seconds a call of ``fn(*args)`` (jitted; dispatched back to back)."""
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    once = max(time.perf_counter() - t0, 1e-6)
    n = max(1, int(target_s / once))
    trials = []
    for _ in range(TRIALS):
        t0 = time.perf_counter()
        out = None
        for _ in range(n):
            out = fn(*args)
        jax.block_until_ready(out)
        trials.append((time.perf_counter() - t0) / n)
    return statistics.median(trials)


def packed_segments(rng: np.random.Generator, t: int, median: int = 250) -> np.ndarray:
    """One row ``[1, t]`` of segment ids 1, 2, ... of log-normal lengths; padding (0) after."""
    seg = np.zeros((1, t), np.int32)
    pos, i = 0, 1
    while pos < t:
        n = int(min(max(8, rng.lognormal(np.log(median), 0.8)), t - pos))
        if n < 8:
            break
        seg[0, pos:pos + n] = i
        pos, i = pos + n, i + 1
    return seg


def _attention_flops(seg: np.ndarray, h: int, k: int) -> float:
    """Causal attention FLOPs of the real (segment) pairs, forward: 4 H K a visible pair."""
    pairs = 0
    for s in np.unique(seg[seg > 0]):
        n = int(np.sum(seg == s))
        pairs += n * (n + 1) // 2
    return 4.0 * h * k * pairs


def run(t_list: list[int], h: int, g: int, k: int, quick: bool, out_dir: str,
        sweep: bool = False) -> list[dict]:
    rng = np.random.default_rng(0)
    dtype = jnp.bfloat16
    interpret = jax.default_backend() != "gpu"
    results = []
    os.makedirs(out_dir, exist_ok=True)
    scale = k ** -0.5
    for t in t_list:
        q = jnp.asarray(rng.standard_normal((1, t, h, k)), dtype)
        kk = jnp.asarray(rng.standard_normal((1, t, g, k)), dtype)
        v = jnp.asarray(rng.standard_normal((1, t, g, k)), dtype)
        seg = packed_segments(rng, t, median=250 if not quick else 40)
        seg_j = jnp.asarray(seg)
        mask = segments.segment_mask(seg_j)
        ref = jax.nn.dot_product_attention(q.astype(jnp.float32), kk.astype(jnp.float32),
                                           v.astype(jnp.float32), mask=mask, scale=scale)
        cases = {
            "pallas_segments": lambda q, kk, v: segments.fused_segment_attention(
                q, kk, v, seg_j, scale, interpret=interpret),
        }
        if sweep:  # other (forward, backward) tiles of the fused kernel
            for fb, bb in ((128, 64), (64, 64), (128, 128)):
                cases[f"pallas_segments_f{fb}_b{bb}"] = (
                    lambda q, kk, v, fb=fb, bb=bb: segments.fused_segment_attention(
                        q, kk, v, seg_j, scale, interpret=interpret, forward_block=fb,
                        backward_block=bb))
        if not interpret:
            cases["cudnn"] = lambda q, kk, v: jax.nn.dot_product_attention(
                q, kk, v, scale=scale, is_causal=True, implementation="cudnn")
        if t <= 2048:
            cases["xla_segments"] = lambda q, kk, v: jax.nn.dot_product_attention(
                q, kk, v, mask=mask, scale=scale, implementation="xla")
        flops = _attention_flops(seg, h, k)
        dense_flops = 4.0 * h * k * t * (t + 1) / 2
        for name, fn in cases.items():
            fwd = jax.jit(fn)
            grad = jax.jit(jax.grad(lambda q, kk, v, fn=fn: jnp.sum(
                fn(q, kk, v).astype(jnp.float32) ** 2), argnums=(0, 1, 2)))
            out = fwd(q, kk, v).astype(jnp.float32)
            real = seg[..., None, None] > 0
            if name != "cudnn":  # cuDNN attends across segments: compared on its own terms
                err = float(jnp.max(jnp.abs(jnp.where(real, out - ref, 0))) /
                            jnp.max(jnp.abs(ref)))
            else:
                dense = jax.nn.dot_product_attention(
                    q.astype(jnp.float32), kk.astype(jnp.float32), v.astype(jnp.float32),
                    scale=scale, is_causal=True)
                err = float(jnp.max(jnp.abs(out - dense)) / jnp.max(jnp.abs(dense)))
            try:
                t_fwd = _time(fwd, (q, kk, v))
                t_bwd = _time(grad, (q, kk, v))
            except Exception as e:  # noqa: BLE001 - a sweep tile may not fit the device
                if not name.startswith("pallas_segments_f"):
                    raise
                print(json.dumps(dict(case=name, tokens=t, error=str(e)[:200])), flush=True)
                continue
            rec = dict(case=name, tokens=t, heads=h, kv_heads=g, head_dim=k,
                       segments=int(seg.max()), real_tokens=int(np.sum(seg > 0)),
                       fwd_ms=t_fwd * 1e3, fwd_bwd_ms=t_bwd * 1e3, max_rel_err=err,
                       real_pair_tflops_fwd=flops / t_fwd / 1e12,
                       dense_causal_tflops_fwd=dense_flops / t_fwd / 1e12,
                       device=jax.devices()[0].device_kind, jax=jax.__version__)
            print(json.dumps(rec), flush=True)
            results.append(rec)
    with open(os.path.join(out_dir, "results.jsonl"), "w") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for results.jsonl")
    p.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test)")
    p.add_argument("--sweep", action="store_true", help="also time other tiles of the kernel")
    args = p.parse_args(argv)
    if args.quick:
        run([128], h=4, g=2, k=32, quick=True, out_dir=args.out, sweep=args.sweep)
    else:
        run([2048, 8192], h=32, g=8, k=128, quick=False, out_dir=args.out, sweep=args.sweep)


if __name__ == "__main__":
    main()
