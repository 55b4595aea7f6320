"""FSDP probe: compile the QLoRA train step of a small Llama on fake CPU devices and report
XLA's memory analysis and where the all-gathers sit in the optimized HLO.

    python -m benchmarks.fsdp_probe --mesh 1,1,1 --mesh 8,1,1 --mesh 1,8,1 [--impl xla|pallas]

Runs on 8 fake CPU devices (``--xla_force_host_platform_device_count=8``, set before jax is
imported). The train step is built as ``benchmarks.train_step.run_ours`` builds it (random NF4
weights with double quantization, LoRA on every linear layer, AdamW, chunked loss, the state's
shardings from ``Placement``), but only compiled (``--run`` also executes it once).

For each mesh it prints one JSON line: XLA's argument/temp sizes, XLA's FLOP count of the
per-device program, and every all-gather (and reduce-scatter / all-reduce) of the HLO: its result
shape, whether it sits inside a while loop body (the scan over layers or the loss chunks) or
outside, and how many bytes it produces. (XLA counts a while body once, not once an iteration,
so the FLOPs compare meshes, they are not the step's total.)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter
from typing import Any, Optional

if "jax" not in sys.modules:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

#: the scaled-down Llama of the probe: (hidden, intermediate, layers, heads, kv heads, vocab)
PROBE_SHAPE = (512, 1536, 8, 8, 2, 4096)

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
                "collective-permute")


def _nbytes(shape_text: str) -> int:
    """Bytes of an HLO shape like ``bf16[8,512]{1,0}`` or a tuple of them."""
    total = 0
    for dt, dims in re.findall(r"\b([a-z]+\d*)\[([0-9,]*)\]", shape_text):
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        total += n * _DTYPE_BYTES.get(dt, 4)
    return total


def hlo_computations(text: str) -> dict[str, list[str]]:
    """Computation name -> its instruction lines, from ``compiled.as_text()``."""
    comps: dict[str, list[str]] = {}
    cur: Optional[str] = None
    for line in text.splitlines():
        m = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if m and not line.startswith(" "):
            cur = m.group(1)
            comps[cur] = []
            continue
        if line.startswith("}"):
            cur = None
            continue
        if cur is not None and line.strip():
            comps[cur].append(line.strip())
    return comps


def _called(line: str) -> list[str]:
    names = []
    for key in ("body", "condition", "to_apply", "calls", "branch_computations",
                "true_computation", "false_computation"):
        m = re.search(key + r"=\{?([%\w.\-, ]+)\}?", line)
        if m:
            names += [n.strip().lstrip("%") for n in m.group(1).split(",") if n.strip()]
    return names


def collectives(text: str) -> list[dict[str, Any]]:
    """Every collective of the HLO: op, result shape, bytes, and the while-loop depth it runs at
    (0: once a step; 1: inside one while body, e.g. once a layer; 2: nested loops)."""
    comps = hlo_computations(text)
    entry = next((m.group(1) for m in re.finditer(r"^ENTRY\s+%?([\w.\-]+)", text, re.M)), None)
    depth: dict[str, int] = {}
    stack = [(entry, 0)] if entry else []
    while stack:
        name, d = stack.pop()
        if name not in comps or depth.get(name, -1) >= d:
            continue
        depth[name] = d
        for line in comps[name]:
            body = re.search(r"body=%?([\w.\-]+)", line) if " while(" in line else None
            for callee in _called(line):
                stack.append((callee, d + 1 if body and callee == body.group(1) else d))
    out = []
    for name, lines in comps.items():
        for line in lines:
            m = re.match(r"^(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([a-z\-]+)(?:-start)?\(", line)
            if not m:
                continue
            op = m.group(2)
            op = op[:-6] if op.endswith("-start") else op
            if op not in _COLLECTIVES:
                continue
            shape = m.group(1)
            out.append(dict(op=op, shape=re.sub(r"\{[0-9,]*\}", "", shape),
                            bytes=_nbytes(shape), loop_depth=depth.get(name, -1),
                            computation=name))
    return out


def summarize(text: str) -> dict[str, Any]:
    """Collectives grouped by (op, loop depth, shape), with counts and bytes."""
    groups = Counter()
    size = {}
    for c in collectives(text):
        key = (c["op"], c["loop_depth"], c["shape"])
        groups[key] += 1
        size[key] = c["bytes"]
    rows = [dict(op=k[0], loop_depth=k[1], shape=k[2], count=n, mib=round(size[k] / 2**20, 3))
            for k, n in sorted(groups.items(), key=lambda kv: -size[kv[0]] * kv[1])]
    return dict(collectives=rows,
                gathered_mib_outside_loops=round(sum(
                    r["mib"] * r["count"] for r in rows
                    if r["op"] == "all-gather" and r["loop_depth"] == 0), 3),
                gathered_mib_in_loops=round(sum(
                    r["mib"] * r["count"] for r in rows
                    if r["op"] == "all-gather" and r["loop_depth"] > 0), 3))


def build_step(shape: Any, mesh: tuple[int, int, int], batch: int, seq: int, r: int = 16,
               remat: str = "full", loss_chunk: int = 128, impl: str = "xla",
               rules: Any = None, hints: bool = True, abstract: bool = False
               ) -> tuple[Any, Any, Any]:
    """(compiled step, state, batch) as ``run_ours`` builds them, on the first devices.

    ``hints``: trace the step under ``jax.set_mesh`` and ``nn.logical_axis_rules`` (activation
    hints and per-use weight gathers on); False shows what XLA does without them (the state before the FSDP fix).
    ``abstract``: compile from shapes only (no array is built: any model size compiles; the
    returned state and batch are ShapeDtypeStructs and the step cannot run).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import qlora_jax as qj
    from benchmarks.train_step import random_params
    from qlora_jax import sharding as shd
    from qlora_jax.models.llama import LlamaForCausalLM
    from qlora_jax.train import state as tstate
    from qlora_jax.train import step as tstep
    from qlora_jax.train.distributed import Placement
    from qlora_jax.train.task import Task

    n_dev = int(np.prod(mesh))
    placement = Placement(shd.make_mesh(*mesh, devices=jax.devices()[:n_dev]),
                          rules or shd.DEFAULT_RULES)
    cfg = shape.llama_config(seq)
    model = LlamaForCausalLM(cfg, lora=qj.LoraConfig(r=r, alpha=16, target_modules="all-linear"),
                             quant=qj.QuantConfig(), dtype=jnp.bfloat16,
                             param_dtype=jnp.bfloat16, impl=impl, remat=remat, attention="xla")
    tx = optax.adamw(2e-4)
    if abstract:
        params = jax.eval_shape(model.init, jax.random.key(0),
                                jnp.ones((1, 8), jnp.int32))["params"]
        state = jax.eval_shape(
            lambda p: tstate.create_state(p, tx, seed=0, adapter_dtype=jnp.float32), params)
        state_sh = placement.state_shardings(state, model.param_axes())
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             state, state_sh)
    else:
        params = random_params(model, shape, r, seed=0, placement=placement)
        state = tstate.create_state(params, tx, seed=0, adapter_dtype=jnp.float32)
        state_sh = placement.state_shardings(state, model.param_axes())
        state = placement.put(state, state_sh)
    task = Task(model, "causal_lm", loss_chunk=loss_chunk)
    fn = tstep.train_step_fn(task, tx, optax.constant_schedule(2e-4), dropout=False)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, shape.vocab, (batch, seq + 1), dtype=np.int32)
    b = {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
         "loss_mask": np.ones((batch, seq), np.float32)}
    if abstract:
        b = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                     sharding=shd.batch_sharding(placement.mesh, placement.rules,
                                                                 v.ndim))
             for k, v in b.items()}
    else:
        b = placement.batch(b)
    step = jax.jit(fn, donate_argnums=0,
                   in_shardings=(state_sh, placement.batch_shardings(b)),
                   out_shardings=(state_sh, placement.replicated()))
    if hints:
        step = shd.in_mesh(step, placement.mesh, placement.rules)
    return step.lower(state, b).compile(), state, b


def _gflops(compiled: Any) -> Optional[float]:
    """XLA's FLOP count of the partitioned (per-device) program, in GFLOP."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports costs
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    return None if flops is None else round(flops / 1e9, 3)


def probe(mesh: tuple[int, int, int], impl: str = "xla", batch: int = 8, seq: int = 256,
          shape: Any = None, run: bool = False, hlo_out: Optional[str] = None,
          **kw: Any) -> dict[str, Any]:
    """One mesh: memory analysis (MiB per device) and the collectives of the compiled step."""
    import time

    import jax

    from benchmarks.train_step import Shape

    shape = shape or Shape("probe", *PROBE_SHAPE)
    t0 = time.perf_counter()
    compiled, state, b = build_step(shape, mesh, batch, seq, impl=impl, **kw)
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    text = compiled.as_text()
    if hlo_out:
        with open(hlo_out, "w") as f:
            f.write(text)
    res = dict(mesh="x".join(map(str, mesh)), impl=impl, hints=kw.get("hints", True),
               batch=batch, seq=seq,
               shape=[shape.hidden, shape.inter, shape.layers, shape.heads, shape.kv_heads,
                      shape.vocab],
               temp_mib=round(mem.temp_size_in_bytes / 2**20, 2),
               argument_mib=round(mem.argument_size_in_bytes / 2**20, 2),
               output_mib=round(mem.output_size_in_bytes / 2**20, 2),
               gflops_per_device=_gflops(compiled),
               compile_s=round(compile_s, 1), **summarize(text))
    if run:
        t0 = time.perf_counter()
        state, metrics = compiled(state, b)
        res["loss"] = float(metrics["loss"])
        res["run_s"] = round(time.perf_counter() - t0, 2)
    del state
    jax.clear_caches()
    return res


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mesh", action="append", default=[], help="data,fsdp,tensor (repeatable)")
    p.add_argument("--impl", default="xla", choices=("xla", "pallas"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--remat", default="full")
    p.add_argument("--run", action="store_true", help="also execute the step once")
    p.add_argument("--shape", default=None,
                   help="a benchmarks.train_step shape (e.g. llama-70b): compiled from shapes "
                        "only (no arrays; --run is ignored)")
    p.add_argument("--loss-chunk", type=int, default=128)
    p.add_argument("--no-hints", action="store_true",
                   help="trace without the mesh context (no activation hints, no gathers)")
    p.add_argument("--hlo-dir", default=None, help="write each mesh's optimized HLO here")
    p.add_argument("--top", type=int, default=12, help="collective groups to print")
    args = p.parse_args(argv)
    from benchmarks.train_step import Shape
    for m in args.mesh or ["1,1,1", "8,1,1", "1,8,1"]:
        mesh = tuple(int(v) for v in m.split(","))
        hlo = None
        if args.hlo_dir:
            os.makedirs(args.hlo_dir, exist_ok=True)
            tag = "_nohints" if args.no_hints else ""
            hlo = os.path.join(args.hlo_dir,
                               f"step_{'x'.join(map(str, mesh))}_{args.impl}{tag}.hlo")
        shape = Shape.get(args.shape) if args.shape else None
        res = probe(mesh, args.impl, args.batch, args.seq, shape=shape,
                    run=args.run and shape is None, hlo_out=hlo, remat=args.remat,
                    hints=not args.no_hints, abstract=shape is not None,
                    loss_chunk=args.loss_chunk)
        res["collectives"] = res["collectives"][:args.top]
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
