"""Decode benchmark: ``qj.generate`` tokens/s against the bandwidth limit, our bf16 model and the peer.

    python -m benchmarks.generate --shape llama-8b --batch 1 --batch 8 --batch 32 --prompt 128 \
        --prompt 2048 --peer bnb --out runs/gen
    python -m benchmarks.generate --shape llama-8b --which adapters --adapters 8 --out runs/gen
    python -m benchmarks.generate --shape tiny --batch 1 --prompt 16 --new 8 --out /tmp/g   # CPU

Systems, each in its own subprocess (its peak memory is its own), one after the other:

- ``nf4``: our Llama with random NF4 + double-quant weights (quantized on the device a layer at a
  time), LoRA r16 adapters on every linear layer of every decoder layer (non-zero B, so the LoRA
  branch is computed for real), bf16 compute, greedy;
- ``bf16``: the same model with bf16 frozen weights;
- ``adapters`` (``--which adapters``): the NF4 model with ``--adapters`` N different adapters
  (``run_adapters``): N rows with their own adapters in one batch (``qj.lora.stack_adapters`` +
  ``adapter_index``) against N single-adapter batch-1 runs and against N rows sharing one
  adapter (the gather's cost), once a prompt length;
- ``bnb`` (``--peer bnb``): transformers + bitsandbytes NF4 + double quant ``generate`` (greedy,
  sdpa attention, no adapters), the reference stack.

Timing: ``generate`` is compiled and run once, then timed 3 times with ``--new`` tokens and 3
times with 1 new token (the prefill alone); medians. Decode time a token = (total - prefill) /
(new - 1). The bandwidth limit: the bytes of every frozen weight and adapter read once a token
(``weights_gib``) over the device-to-device copy bandwidth measured in the same process;
``fraction_of_limit`` = limit time / measured time. KV-cache reads are not counted in the limit
(they are small at these lengths: reported as ``kv_cache_gib``).

Prints one JSON line a measurement and appends it to ``--out/generate.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, Optional

from benchmarks.train_step import SHAPES, Shape


def copy_bandwidth(nbytes: Optional[int] = None) -> float:
    """Device-to-device copy bandwidth, bytes read + written a second (median of 5).

    ``nbytes`` defaults to 2 GiB on an accelerator and 256 MiB on CPU: far above any CPU cache,
    the same rate within a few percent, and 1.5 s instead of 10 s on 2 CPU cores.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    if nbytes is None:
        nbytes = (256 << 20) if jax.default_backend() == "cpu" else (2 << 30)
    n = nbytes // 4
    x = jnp.ones((n,), jnp.float32)
    f = jax.jit(lambda a: a + 1.0)
    jax.block_until_ready(f(x))
    times = []
    for _ in range(5):
        t = time.perf_counter()
        jax.block_until_ready(f(x))
        times.append(time.perf_counter() - t)
    return 2 * n * 4 / float(np.median(times))


def _model(shape: Shape, weights: str, max_len: int, r: int):
    import jax.numpy as jnp

    import qlora_jax as qj
    from qlora_jax.models.llama import LlamaForCausalLM

    cfg = shape.llama_config(max_len)
    lora = qj.LoraConfig(r=r, alpha=16, target_modules="all-linear")
    quant = qj.QuantConfig() if weights == "nf4" else None
    return LlamaForCausalLM(cfg, lora=lora, quant=quant, dtype=jnp.bfloat16,
                            param_dtype=jnp.bfloat16)


def _nonzero_b(params: Any, seed: int) -> Any:
    """Small random LoRA B matrices (the benchmark's params start with B = 0)."""
    import jax
    import jax.numpy as jnp

    from qlora_jax.lora import tree as lora_tree

    flat = lora_tree.flatten(params)
    key = jax.random.key(seed)
    for i, (path, leaf) in enumerate(sorted(flat.items())):
        if path[-1] == "lora_b":
            flat[path] = (jax.random.normal(jax.random.fold_in(key, i), leaf.shape, jnp.float32)
                          * 1e-3).astype(leaf.dtype)
    return lora_tree.unflatten(flat)


def _timings(model: Any, params: Any, ids: Any, new: int,
             adapter_index: Any = None) -> dict[str, float]:
    """Compiles and runs ``generate`` once, then medians of 3 timed runs of ``new`` tokens and of
    1 token (the prefill). Decode time a token = (total - prefill) / (new - 1)."""
    import jax
    import numpy as np

    import qlora_jax as qj

    def timed(n: int) -> float:
        t = time.perf_counter()
        jax.block_until_ready(qj.generate(model, params, ids, max_new_tokens=n,
                                          eos_token_id=-1, adapter_index=adapter_index))
        return time.perf_counter() - t

    t0 = time.perf_counter()
    timed(new)
    first = time.perf_counter() - t0
    timed(1)
    total = float(np.median([timed(new) for _ in range(3)]))
    prefill = float(np.median([timed(1) for _ in range(3)]))
    decode = max(total - prefill, 1e-9) / (new - 1)
    return dict(first=first, total=total, prefill=prefill, decode=decode)


def _sig(x: float) -> float:
    """A ratio to 4 significant digits (rounding to decimals turned a tiny-shape CPU row's
    ratio into 0.0)."""
    return float(f"{x:.4g}")


def _row(t: dict[str, float], batch: int) -> dict[str, Any]:
    row = dict(first_call_s=round(t["first"], 2), total_s=round(t["total"], 4),
               prefill_s=round(t["prefill"], 4),
               decode_tokens_per_s=round(batch / t["decode"], 1),
               ms_per_token=round(1000 * t["decode"], 3))
    if t["total"] <= t["prefill"]:
        # The decode time is the difference of two medians; when timer noise exceeds it (tiny
        # shapes on a busy CPU) the figures of this row mean nothing: say so in the row.
        row["decode_below_noise"] = True
    return row


def _device_info() -> dict[str, Any]:
    import jax

    dev = jax.devices()[0]
    info = dict(peak_gib=round((dev.memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30, 3),
                device=dev.device_kind, jax=jax.__version__)
    env = {k: v for k, v in sorted(os.environ.items())  # not this script's own plumbing
           if k.startswith("QLORA_JAX_") and k != "QLORA_JAX_GEN_PROFILE"}
    return {**info, "env": env} if env else info  # tuning switches set for this row


def _prompts(shape: Shape, batch: int, prompt: int) -> Any:
    import jax.numpy as jnp
    import numpy as np

    return jnp.asarray(np.random.default_rng(0).integers(0, shape.vocab, (batch, prompt),
                                                         dtype=np.int32))


def run_ours(shape: Shape, weights: str, batch: int, prompt: int, new: int, r: int
             ) -> dict[str, Any]:
    import jax

    from qlora_jax.lora import tree as lora_tree
    from benchmarks.train_step import random_params

    model = _model(shape, weights, prompt + new, r)
    params = _nonzero_b(random_params(model, shape, r, seed=0), seed=1)
    jax.block_until_ready(params)
    weights_bytes = lora_tree.nbytes(params)
    ids = _prompts(shape, batch, prompt)
    t = _timings(model, params, ids, new)
    top = int(os.environ.get("QLORA_JAX_GEN_PROFILE", "0") or 0)
    prof = _profile(model, params, ids, new, top) if top else {}
    bw = copy_bandwidth()
    limit = weights_bytes / bw  # read once a token at the copy's rate (bytes read + written /s)
    kv = 2 * shape.layers * batch * (prompt + new) * shape.kv_heads * shape.head_dim * 2
    return dict(system="qlora_jax", weights=weights, **_row(t, batch),
                weights_gib=round(weights_bytes / 2**30, 3), kv_cache_gib=round(kv / 2**30, 3),
                copy_gb_s=round(bw / 1e9, 1), limit_ms=round(1000 * limit, 3),
                fraction_of_limit=_sig(limit / t["decode"]), **prof, **_device_info())


def _profile(model: Any, params: Any, ids: Any, new: int, top: int) -> dict[str, Any]:
    """Device time a generated token by kernel category and the ``top`` kernels, from a
    ``jax.profiler`` trace of one ``generate`` call (``--profile``; prefill included, spread
    over the ``new`` tokens)."""
    import tempfile

    import jax

    import qlora_jax as qj
    from benchmarks import profile_summary

    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            jax.block_until_ready(qj.generate(model, params, ids, max_new_tokens=new,
                                              eos_token_id=-1))
        s = profile_summary.summarize(d, steps=new, top=top)
    # Without device events (CPU) the summary is {"error": ..., "processes": ...}: kept as is.
    return dict(profile={k: v for k, v in s.items() if k not in ("trace", "steps")})


def run_adapters(shape: Shape, n: int, prompt: int, new: int, r: int) -> list[dict[str, Any]]:
    """Many adapters over one NF4 base: ``n`` rows, each with its own adapter, in one batch.

    Rows (``adapters`` field): ``single_b1`` (one adapter, batch 1; then each of the ``n``
    adapters runs once with the compiled program, ``single_runs_s`` their summed wall time),
    ``one_shared`` (one plain adapter, batch ``n``), ``stacked_same`` (the ``n`` adapters
    stacked, every row adapter 0: the gather at no diversity) and ``stacked_mixed`` (row i
    adapter i). Ratios on the mixed row: ``vs_single_runs`` = its decode tokens/s over
    ``single_b1``'s (n single runs take n times one), ``end_to_end_vs_single_runs`` = the n
    runs' wall time over its total, ``vs_one_shared`` = its tokens/s over ``one_shared``'s.
    """
    import jax
    import jax.numpy as jnp

    import qlora_jax as qj
    from benchmarks.train_step import random_params

    model = _model(shape, "nf4", prompt + new, r)
    base = random_params(model, shape, r, seed=0)
    trees = [_nonzero_b(base, seed=1 + j) for j in range(n)]
    stacked = qj.lora.stack_adapters(trees)
    jax.block_until_ready((trees, stacked))
    ids = _prompts(shape, n, prompt)
    info = dict(system="qlora_jax", weights="nf4", n_adapters=n)
    rows = []
    t1 = _timings(model, trees[0], ids[:1], new)
    runs = []
    for j in range(n):  # each adapter once, with row j's prompt: the compiled program is reused
        t = time.perf_counter()
        jax.block_until_ready(qj.generate(model, trees[j], ids[j:j + 1], max_new_tokens=new,
                                          eos_token_id=-1))
        runs.append(time.perf_counter() - t)
    rows.append(dict(adapters="single_b1", batch=1, **_row(t1, 1),
                     single_runs_s=round(sum(runs), 4), **info))
    shared = _timings(model, trees[0], ids, new)
    rows.append(dict(adapters="one_shared", batch=n, **_row(shared, n), **info))
    same = _timings(model, stacked, ids, new, adapter_index=jnp.zeros((n,), jnp.int32))
    rows.append(dict(adapters="stacked_same", batch=n, **_row(same, n),
                     vs_one_shared=_sig(shared["decode"] / same["decode"]), **info))
    mixed = _timings(model, stacked, ids, new, adapter_index=jnp.arange(n, dtype=jnp.int32))
    rows.append(dict(adapters="stacked_mixed", batch=n, **_row(mixed, n),
                     vs_single_runs=_sig(n * t1["decode"] / mixed["decode"]),
                     end_to_end_vs_single_runs=_sig(sum(runs) / mixed["total"]),
                     vs_one_shared=_sig(shared["decode"] / mixed["decode"]),
                     vs_stacked_same=_sig(same["decode"] / mixed["decode"]), **info))
    dev = _device_info()
    return [{**row, **dev} for row in rows]


def run_bnb(shape: Shape, batch: int, prompt: int, new: int) -> dict[str, Any]:
    import torch

    from benchmarks import peer_bnb

    model = peer_bnb._build(shape, prompt + new, "cuda").eval()
    ids = torch.randint(0, shape.vocab, (batch, prompt), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(0))

    def timed(n: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    timed(8)
    total = sorted(timed(new) for _ in range(3))[1]
    prefill = sorted(timed(1) for _ in range(3))[1]
    decode = max(total - prefill, 1e-9) / (new - 1)
    return dict(system="transformers+bitsandbytes", weights="nf4", total_s=round(total, 4),
                prefill_s=round(prefill, 4), decode_tokens_per_s=round(batch / decode, 1),
                ms_per_token=round(1000 * decode, 3),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3),
                device=torch.cuda.get_device_name(), torch=torch.__version__)


def _child(args: argparse.Namespace) -> None:
    shape = Shape.get(args.shape)
    common = dict(bench="generate", shape=shape.name, batch=args.batch[0],
                  prompt=args.prompt[0], new=args.new, rank=args.rank)
    if args.system == "bnb":
        rows = [run_bnb(shape, args.batch[0], args.prompt[0], args.new)]
    elif args.system == "adapters":
        rows = run_adapters(shape, args.adapters, args.prompt[0], args.new, args.rank)
    else:
        rows = [run_ours(shape, args.system, args.batch[0], args.prompt[0], args.new, args.rank)]
    for res in rows:
        print("RESULT " + json.dumps({**common, **res}), flush=True)


def _system_fields(system: str) -> dict[str, Any]:
    """The ``system`` / ``weights`` fields a row of ``--which`` / ``--peer`` name carries."""
    if system == "bnb":
        return dict(system="transformers+bitsandbytes", weights="nf4")
    return dict(system="qlora_jax", weights="nf4" if system == "adapters" else system)


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama-8b", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, action="append", default=None)
    p.add_argument("--prompt", type=int, action="append", default=None)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--which", default="nf4,bf16",
                   help="our systems: comma list of nf4, bf16, adapters (the many-adapter rows "
                        "at batch --adapters, once a prompt length)")
    p.add_argument("--adapters", type=int, default=8, help="adapters (and rows) of 'adapters'")
    p.add_argument("--peer", action="append", default=[], choices=("bnb",))
    p.add_argument("--profile", type=int, nargs="?", const=25, default=0, metavar="TOP",
                   help="add the device time a token by kernel (a jax.profiler trace) to our "
                        "rows: by category and the TOP kernels (default 25)")
    p.add_argument("--out", default="benchmarks/out")
    p.add_argument("--system", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.batch = args.batch or [1]
    args.prompt = args.prompt or [128]
    if args.new < 2:
        raise SystemExit("--new must be >= 2 (decode time = total - prefill over new - 1)")
    if args.adapters < 2:
        raise SystemExit(f"--adapters must be >= 2, got {args.adapters}")
    if args.system:
        _child(args)
        return
    os.makedirs(args.out, exist_ok=True)
    systems = [s for s in args.which.split(",") if s] + list(args.peer)
    for s in systems:
        if s not in ("nf4", "bf16", "adapters", "bnb"):
            raise SystemExit(f"unknown system {s!r}: --which takes nf4, bf16 and adapters")
    rows = []
    runs = [(prompt, batch, system) for prompt in args.prompt for batch in args.batch
            for system in systems if system != "adapters"]
    if "adapters" in systems:
        runs += [(prompt, args.adapters, "adapters") for prompt in args.prompt]
    for prompt, batch, system in runs:
        cmd = [sys.executable, "-m", "benchmarks.generate", "--system", system,
               "--shape", args.shape, "--batch", str(batch), "--prompt", str(prompt),
               "--new", str(args.new), "--rank", str(args.rank), "--adapters", str(args.adapters)]
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
        if args.profile:
            env["QLORA_JAX_GEN_PROFILE"] = str(args.profile)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env)
        sys.stderr.write(proc.stderr)
        found = [json.loads(l[len("RESULT "):]) for l in proc.stdout.splitlines()
                 if l.startswith("RESULT ")]
        if proc.returncode != 0 or not found:
            last = [l for l in proc.stderr.splitlines() if l.strip()][-1:] or [""]
            found = [dict(bench="generate", shape=args.shape, batch=batch, prompt=prompt,
                          **_system_fields(system),
                          error=f"exit code {proc.returncode}: {last[0][:300]}")]
        for res in found:
            rows.append(res)
            print(json.dumps(res), flush=True)
            with open(os.path.join(args.out, "generate.jsonl"), "a") as f:
                f.write(json.dumps(res) + "\n")
    for r in rows:
        if "decode_tokens_per_s" in r:
            name = r["system"] + (f" {r['adapters']}" if "adapters" in r else "")
            ratios = " ".join(f"{k} {r[k]}" for k in ("fraction_of_limit", "vs_single_runs",
                                                      "end_to_end_vs_single_runs",
                                                      "vs_one_shared") if k in r)
            print(f"{r['shape']} b{r['batch']} p{r['prompt']} {name:>26} {r['weights']}: "
                  f"{r['decode_tokens_per_s']:>9} tok/s {r['ms_per_token']:>8} ms/token "
                  f"{ratios}", flush=True)


if __name__ == "__main__":
    main()
