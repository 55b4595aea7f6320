"""Decode GEMVs of one layer: q/k/v and gate/up as separate launches vs one ``gemv_4bit_multi``.

    python -m benchmarks.gemv_multi --out runs/gemv_multi            # llama-8b layer shapes (GPU)
    python -m benchmarks.gemv_multi --quick --out /tmp/gm            # tiny shapes (CPU smoke)

Each weight is a stack of layers read in place (``LayerView``, as the decode loop reads it),
timed over rotating layers so no call finds its weight in L2 (``benchmarks.kernels.time_jax``).
Prints one JSON line a group (microseconds separate and fused, GB/s of 4-bit codes + absmax,
the largest difference between the two outputs) and appends it to ``--out/gemv_multi.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

import qlora_jax as qj
from benchmarks.kernels import time_jax
from qlora_jax.quant.kernels import gpu
from qlora_jax.quant.kernels.multi import gemv_4bit_multi
from qlora_jax.quant.layer_view import LayerView

#: Weight shapes ``[out, in]`` of one llama-8b layer that read the same input.
GROUPS = {"qkv": [(4096, 4096), (1024, 4096), (1024, 4096)],
          "gate_up": [(14336, 4096), (14336, 4096)]}
QUICK = {"qkv": [(64, 128), (32, 128), (32, 128)], "gate_up": [(128, 128), (128, 128)]}


def _stack(shape: tuple, layers: int, seed: int) -> Any:
    """A stack of ``layers`` NF4 + double-quant weights (quantized a layer at a time)."""
    key = jax.random.key(seed)
    qs = [qj.quant.quantize(jax.random.normal(jax.random.fold_in(key, i), shape, jnp.bfloat16),
                            "nf4", 64, True) for i in range(layers)]
    return jax.tree.map(lambda *a: jnp.stack(a), *qs)


def _nbytes(q: Any) -> int:
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(q))


def run_group(name: str, shapes: list, layers: int, quick: bool) -> dict[str, Any]:
    stacks = [_stack(s, layers, seed=j) for j, s in enumerate(shapes)]
    x = jax.random.normal(jax.random.key(99), (1, shapes[0][1]), jnp.bfloat16)
    sets = [(x, stacks, jnp.int32(i)) for i in range(layers)]

    def separate(x, stacks, i):
        return [gpu.linear_layer(x, LayerView(s, i)) for s in stacks]

    def fused(x, stacks, i):
        return gemv_4bit_multi(x, [LayerView(s, i) for s in stacks])

    diff = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
               for a, b in zip(jax.jit(separate)(*sets[0]), jax.jit(fused)(*sets[0])))
    t_sep = time_jax(separate, sets, quick)
    t_fused = time_jax(fused, sets, quick)
    layer_bytes = sum(_nbytes(s) for s in stacks) / layers
    dev = jax.devices()[0]
    return dict(bench="gemv_multi", group=name, shapes=[list(s) for s in shapes],
                separate_us=round(t_sep * 1e6, 2), fused_us=round(t_fused * 1e6, 2),
                speedup=round(t_sep / t_fused, 3),
                separate_gb_s=round(layer_bytes / t_sep / 1e9, 1),
                fused_gb_s=round(layer_bytes / t_fused / 1e9, 1),
                max_abs_diff=diff, device=dev.device_kind, jax=jax.__version__)


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="tiny shapes, few layers (CPU smoke)")
    p.add_argument("--layers", type=int, default=16, help="layers a stack (rotated while timed)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    groups = QUICK if args.quick else GROUPS
    for name, shapes in groups.items():
        res = run_group(name, shapes, 2 if args.quick else args.layers, args.quick)
        print(json.dumps(res), flush=True)
        with open(os.path.join(args.out, "gemv_multi.jsonl"), "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
