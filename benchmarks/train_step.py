"""QLoRA train-step benchmark: tokens/s, MFU, peak device memory and compile time, against peers.

    python -m benchmarks.train_step --shape llama-8b --batch 1 --seq 2048 --rank 16 --peer bnb --peer qwix
    python -m benchmarks.train_step --seq 32768 --seq 131072 --seq 262144 --remat full_offload \
        --steps 2 --peer bnb      # long rows: layer inputs in host memory, chunked MLP

Each system runs in its own subprocess (so each one's peak memory is its own and JAX does not
preallocate), one after the other, in the same invocation. Every measurement prints one JSON line
and is appended to ``--out/train_step.jsonl``.

Model: a Llama-shaped causal LM with random weights, quantized to NF4 + double quantization on the
device one layer at a time (never the whole model in bf16), LoRA rank R on every linear layer of
every decoder layer (q, k, v, o, gate, up, down; not the head), bf16 compute, AdamW on the adapters.

MFU convention: model FLOPs a token = 4 N (N = parameters of all matmuls, head included: forward
2N + input gradients 2N; frozen weights get no weight gradient) + 6 N_lora (adapters get both
gradients) + attention 6 L T D (causal: half of the 12 L T D a full attention matrix would cost,
forward QK^T and AV plus their two input gradients each). ``mfu_full_attention`` counts 12 L T D.
Rematerialisation is not counted (hardware FLOPs are higher than model FLOPs with remat).
Memory: ``peak_gib`` is the device allocator's peak; ``host_peak_gib`` the process's peak resident
set (with ``--remat full_offload`` it holds the layer inputs, L x T x D bf16).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any, Optional

#: name: (hidden D, intermediate F, layers L, heads H, kv heads G, vocab V)
SHAPES = {
    "tiny": (128, 256, 2, 4, 2, 1000),
    "llama-1b": (2048, 8192, 16, 32, 8, 128256),
    "llama-8b": (4096, 14336, 32, 32, 8, 128256),
    "llama-70b": (8192, 28672, 80, 64, 8, 128256),
}
PEERS = ("bnb", "qwix")


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @classmethod
    def get(cls, name: str) -> "Shape":
        if name not in SHAPES:
            raise SystemExit(f"unknown shape {name!r}; choose from {sorted(SHAPES)}")
        return cls(name, *SHAPES[name])

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def matmul_params(self) -> int:
        """N: parameters of every matmul (decoder projections and the head)."""
        d, f, k = self.hidden, self.inter, self.head_dim
        attn = d * self.heads * k * 2 + d * self.kv_heads * k * 2
        return self.layers * (attn + 3 * d * f) + d * self.vocab

    def lora_params(self, r: int) -> int:
        d, f, k = self.hidden, self.inter, self.head_dim
        pairs = [(d, self.heads * k), (d, self.kv_heads * k), (d, self.kv_heads * k),
                 (self.heads * k, d), (d, f), (d, f), (f, d)]
        return self.layers * sum(r * (i + o) for i, o in pairs)

    def llama_config(self, max_len: int) -> Any:
        """The LlamaConfig of this shape (Llama-3 rope theta; positions up to ``max_len``)."""
        from qlora_jax.models.llama import LlamaConfig

        return LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden,
                           intermediate_size=self.inter, num_hidden_layers=self.layers,
                           num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                           head_dim=self.head_dim, max_position_embeddings=max(max_len, 2048),
                           rope_theta=500000.0)

    def flops_per_token(self, r: int, seq: int, full_attention: bool = False) -> float:
        attn = (12 if full_attention else 6) * self.layers * seq * self.hidden
        return 4.0 * self.matmul_params() + 6.0 * self.lora_params(r) + attn


def peak_flops(device_kind: str) -> float:
    """Dense bf16 peak of the device (for MFU), from its kind string."""
    kind = device_kind.lower()
    if "h100" in kind or "h200" in kind or "gh200" in kind:
        return 989e12
    if "a100" in kind:
        return 312e12
    if "v5" in kind:
        return 197e12
    return float("nan")


def _ratio(x: float) -> Optional[float]:
    """A rounded ratio, or None (JSON null) where the device peak is unknown."""
    return None if x != x else round(x, 4)


# -- ours ---------------------------------------------------------------------------------------

def random_params(model: Any, shape: Shape, r: int, seed: int, placement: Any = None) -> Any:
    """Random params built leaf by leaf on the device; 4-bit kernels quantized a layer at a time.

    With a ``placement`` (a mesh), each leaf is built directly with its sharding, so no device
    ever holds more than its own share of the model.
    """
    import jax
    import jax.numpy as jnp

    from qlora_jax.lora import tree as lora_tree
    from qlora_jax.quant.qtensor import QTensor

    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
    shardings = (lora_tree.flatten(placement.tree_shardings(abstract, model.param_axes()))
                 if placement is not None else {})
    key = jax.random.key(seed)
    out = {}
    for i, (path, leaf) in enumerate(lora_tree.flatten(abstract).items()):
        k = jax.random.fold_in(key, i)
        sh = shardings.get(path)
        if isinstance(leaf, QTensor):
            out[path] = _random_qtensor(leaf, k, sh)
            continue
        if path[-1] == "lora_b":
            make = lambda k, s=leaf.shape, d=leaf.dtype: jnp.zeros(s, d)  # noqa: E731
        elif path[-1] == "scale":
            make = lambda k, s=leaf.shape, d=leaf.dtype: jnp.ones(s, d)  # noqa: E731
        else:
            std = 1.0 / (leaf.shape[-2] ** 0.5) if leaf.ndim >= 2 else 0.02
            make = lambda k, s=leaf.shape, d=leaf.dtype, sd=std: (  # noqa: E731
                jax.random.normal(k, s, jnp.float32) * sd).astype(d)
        out[path] = jax.jit(make, out_shardings=sh)(k)
    return lora_tree.unflatten(out)


def _random_qtensor(abstract: Any, key: Any, sharding: Any = None) -> Any:
    import jax
    import jax.numpy as jnp

    from qlora_jax.quant.blockwise import _quantize_flat
    from qlora_jax.quant.qtensor import QTensor
    from qlora_jax.sharding import replicated

    out_f, in_f = abstract.logical_shape
    settings = dict(qtype=abstract.qtype, block_size=abstract.block_size,
                    nested_block_size=abstract.nested_block_size)

    outs = None
    if sharding is not None:
        rep = replicated(sharding.packed.mesh)
        outs = (sharding.packed, sharding.absmax, sharding.nested_absmax or rep,
                sharding.offset or rep)

    @functools.partial(jax.jit, out_shardings=outs)
    def build(key):
        def one(i):
            w = jax.random.normal(jax.random.fold_in(key, i), (out_f * in_f,), jnp.float32)
            return _quantize_flat((w / in_f ** 0.5).astype(abstract.dtype), **settings)
        return jax.lax.map(one, jnp.arange(abstract.stack_shape[0]))

    packed, absmax, nested, offset = build(key)
    return QTensor(packed, absmax, nested, offset, logical_shape=abstract.logical_shape,
                   dtype=abstract.dtype, qtype=abstract.qtype, block_size=abstract.block_size,
                   nested_block_size=abstract.nested_block_size)


def run_ours(shape: Shape, batch: int, seq: int, r: int, steps: int, remat: str,
             loss_chunk: int, offload_state: bool, impl: str,
             adapter_dtype: str = "float32", mesh: tuple[int, int, int] = (1, 1, 1),
             profile: Optional[str] = None, attention: str = "auto",
             in_place: bool = True, mlp_chunk: int = 8192) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import qlora_jax as qj

    from qlora_jax.lora import tree as lora_tree
    from qlora_jax import sharding as shd
    from qlora_jax.models.llama import LlamaForCausalLM
    from qlora_jax.train import state as tstate
    from qlora_jax.train import step as tstep
    from qlora_jax.train.distributed import Placement
    from qlora_jax.train.task import Task

    n_dev = int(np.prod(mesh))
    if n_dev > jax.device_count():
        raise SystemExit(f"--mesh {mesh} needs {n_dev} devices; this machine has "
                         f"{jax.device_count()}")
    placement = Placement(shd.make_mesh(*mesh, devices=jax.devices()[:n_dev]), shd.DEFAULT_RULES)
    if batch % placement.batch_divisor:
        raise SystemExit(f"--batch {batch} does not split over the batch axes of --mesh {mesh}")
    cfg = shape.llama_config(seq)
    lora = qj.LoraConfig(r=r, alpha=16, target_modules="all-linear")
    auto = remat == "auto"  # chosen below on the compiled step (qlora_jax.train.remat)
    model = LlamaForCausalLM(cfg, lora=lora, quant=qj.QuantConfig(), dtype=jnp.bfloat16,
                             param_dtype=jnp.bfloat16, impl=impl, remat="full" if auto else remat,
                             attention=attention, in_place=in_place, mlp_chunk=mlp_chunk)
    t0 = time.perf_counter()
    params = random_params(model, shape, r, seed=0, placement=placement)
    jax.block_until_ready(params)
    build_s = time.perf_counter() - t0
    weights_bytes = lora_tree.nbytes(params)
    tx = optax.adamw(2e-4)
    state = tstate.create_state(params, tx, seed=0, adapter_dtype=jnp.dtype(adapter_dtype),
                                offload_state=offload_state)
    del params
    state_sh = placement.state_shardings(state, model.param_axes())
    state = placement.put(state, state_sh)
    task = Task(model, "causal_lm", loss_chunk=loss_chunk)
    # The trainer's own jit: state shardings in and out, batch rows split over the batch axes,
    # traced under the mesh (activation hints and per-layer weight gathers, FSDP_NOTES.md).
    step = tstep.make_train_step(task, tx, optax.constant_schedule(2e-4), dropout=False,
                                 offload_state=offload_state,
                                 shardings=placement.step_shardings(state_sh))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, shape.vocab, (batch, seq + 1), dtype=np.int32)
    b = {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
         "loss_mask": np.ones((batch, seq), np.float32)}
    b = placement.batch(b)
    auto_line = None
    if auto:  # the launcher's model.remat="auto": fastest policy whose compiled step fits
        from qlora_jax.train import remat as remat_auto

        def make(mode):
            return tstep.make_train_step(Task(model.clone(remat=mode), "causal_lm",
                                              loss_chunk=loss_chunk), tx,
                                         optax.constant_schedule(2e-4), dropout=False,
                                         offload_state=offload_state,
                                         shardings=placement.step_shardings(state_sh))
        budget, source = remat_auto.memory_budget(0.0, list(placement.mesh.devices.flat))
        choice = remat_auto.choose(lambda m: remat_auto.compiled_peak(make(m), state, b),
                                   budget, source)
        remat, auto_line, step = choice.mode, choice.describe(), make(choice.mode)
        print(auto_line, file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    compiled = step.lower(state, b).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    xla_memory = {k: round(getattr(mem, k + "_in_bytes", 0) / 2**30, 3)
                  for k in ("argument_size", "output_size", "alias_size", "temp_size",
                            "host_temp_size")} \
        if mem is not None else None
    state, metrics = compiled(state, b)
    loss0 = float(metrics["loss"])
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, metrics = compiled(state, b)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t)
    med = float(np.median(times))
    devs = list(placement.mesh.devices.flat)
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in devs]
    tps = batch * seq / med
    pf = peak_flops(devs[0].device_kind) * n_dev
    result = dict(system="qlora_jax", remat=remat, remat_auto=auto_line, loss_chunk=loss_chunk,
                  adapter_dtype=adapter_dtype, offload_state=offload_state,
                  impl=qj.quant.resolve_impl(impl), mesh="x".join(map(str, mesh)),
                  attention=attention, in_place=in_place, mlp_chunk=mlp_chunk,
                  xla_memory_gib=xla_memory,
                  devices=n_dev, step_s=round(med, 4), tokens_per_s=round(tps, 1),
                  tokens_per_s_per_device=round(tps / n_dev, 1),
                  mfu=_ratio(tps * shape.flops_per_token(r, seq) / pf),
                  mfu_full_attention=_ratio(tps * shape.flops_per_token(r, seq, True) / pf),
                  compile_s=round(compile_s, 1), build_s=round(build_s, 1),
                  weights_gib=round(weights_bytes / 2**30, 3),
                  peak_gib=round(max(peaks) / 2**30, 3),
                  peak_gib_per_device=[round(p / 2**30, 3) for p in peaks],
                  loss_first=round(loss0, 4), loss_last=round(float(metrics["loss"]), 4),
                  device=devs[0].device_kind, jax=jax.__version__)
    if profile:
        result["profile"] = _profile(compiled, state, b, profile)
    return result


def _profile(compiled: Any, state: Any, batch: Any, out_dir: str, steps: int = 2) -> dict:
    """Runs ``steps`` steps under ``jax.profiler`` and summarizes device time; saves the HLO."""
    import jax

    from benchmarks import profile_summary

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "step.hlo.txt"), "w") as f:
        f.write(compiled.as_text())
    with jax.profiler.trace(out_dir, create_perfetto_trace=True):
        for _ in range(steps):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics["loss"])
    summary = profile_summary.summarize(out_dir, steps=steps, top=60)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return {k: summary.get(k) for k in ("device_busy_ms_per_step", "device_span_ms_per_step",
                                        "by_category_ms_per_step")}


# -- driver -------------------------------------------------------------------------------------

def _mesh(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(v) for v in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 1:
        raise SystemExit(f"--mesh {text!r}: give three positive counts, data,fsdp,tensor")
    return parts  # type: ignore[return-value]


def _child(args: argparse.Namespace) -> None:
    shape = Shape.get(args.shape)
    common = dict(shape=shape.name, batch=args.batch, seq=args.seq, rank=args.rank,
                  trainable=shape.lora_params(args.rank), matmul_params=shape.matmul_params())
    if args.system == "ours":
        res = run_ours(shape, args.batch, args.seq, args.rank, args.steps, args.remat,
                       args.loss_chunk, args.offload_state, args.impl, args.adapter_dtype,
                       _mesh(args.mesh), args.profile, args.attention, not args.no_in_place,
                       args.mlp_chunk)
    elif args.system == "bnb":
        from benchmarks import peer_bnb
        res = peer_bnb.run(shape, args.batch, args.seq, args.rank, args.steps)
    elif args.system == "qwix":
        from benchmarks import peer_qwix
        res = peer_qwix.run(shape, args.batch, args.seq, args.rank, args.steps)
    else:
        raise SystemExit(f"unknown system {args.system!r}")
    # Host memory: the process's peak resident set (pinned host buffers included).
    res["host_peak_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    if "tokens_per_s" in res and "mfu" not in res:
        pf = peak_flops(res.get("device", ""))
        res["mfu"] = _ratio(res["tokens_per_s"] * shape.flops_per_token(args.rank, args.seq) / pf)
    print("RESULT " + json.dumps({**common, **res}), flush=True)


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama-8b", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, action="append", default=None,
                   help="tokens a row (repeat for several lengths, each run in turn; default 2048)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="timed steps after the compiling one")
    p.add_argument("--remat", default="full",
                   choices=("none", "full", "dots_saveable", "offload", "qkv", "attention",
                            "full_offload", "auto"))
    p.add_argument("--mlp-chunk", type=int, default=8192,
                   help="ours: rows longer than this run the MLP in chunks of it (0: never)")
    p.add_argument("--loss-chunk", type=int, default=512, help="0: full logits")
    p.add_argument("--offload-state", action="store_true")
    p.add_argument("--impl", default="auto", choices=("auto", "xla", "pallas"))
    p.add_argument("--adapter-dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn"))
    p.add_argument("--no-in-place", action="store_true",
                   help="ours: nn.scan slices each layer's 4-bit kernels (the pre-LayerView loop)")
    p.add_argument("--mesh", default="1,1,1",
                   help="data,fsdp,tensor device counts for ours (--batch is the global batch)")
    p.add_argument("--profile", default=None,
                   help="directory: profile 2 steps of ours there (trace, summary.json, HLO)")
    p.add_argument("--peer", action="append", default=[], choices=PEERS)
    p.add_argument("--skip-ours", action="store_true")
    p.add_argument("--out", default="benchmarks/out")
    p.add_argument("--system", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    seqs = args.seq or [2048]
    if args.system:
        args.seq = seqs[0]
        _child(args)
        return
    os.makedirs(args.out, exist_ok=True)
    systems = ([] if args.skip_ours else ["ours"]) + list(args.peer)
    for seq in seqs:
        _run_length(args, systems, seq)


def _run_length(args: argparse.Namespace, systems: list[str], seq: int) -> None:
    """Every system at one row length, each in its own subprocess; prints the ratios."""
    results = []
    for system in systems:
        cmd = [sys.executable, "-m", "benchmarks.train_step", "--system", system,
               "--shape", args.shape, "--batch", str(args.batch), "--seq", str(seq),
               "--rank", str(args.rank), "--steps", str(args.steps), "--remat", args.remat,
               "--loss-chunk", str(args.loss_chunk), "--impl", args.impl,
               "--adapter-dtype", args.adapter_dtype, "--mesh", args.mesh,
               "--attention", args.attention, "--mlp-chunk", str(args.mlp_chunk)]
        if args.profile and system == "ours":
            cmd += ["--profile", args.profile]
        if args.offload_state:
            cmd.append("--offload-state")
        if args.no_in_place:
            cmd.append("--no-in-place")
        # No preallocation (each system's peak is its own), and JAX may grow to 95% of the
        # device (its default cap is 75%) like PyTorch's allocator.
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
        # The child's stderr (progress, warnings, tracebacks) goes straight to ours.
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            res = dict(system=system, shape=args.shape, batch=args.batch, seq=seq,
                       rank=args.rank, error=f"exit code {proc.returncode} (traceback above); "
                                             f"stdout: {proc.stdout[-500:]}")
        else:
            res = json.loads(line[len("RESULT "):])
        results.append(res)
        print(json.dumps(res), flush=True)
        with open(os.path.join(args.out, "train_step.jsonl"), "a") as f:
            f.write(json.dumps(res) + "\n")
    ours = next((r for r in results if r.get("system") == "qlora_jax" and "tokens_per_s" in r), None)
    if ours:
        for r in results:
            if r is not ours and "tokens_per_s" in r:
                print(f"qlora_jax / {r['system']}: {ours['tokens_per_s'] / r['tokens_per_s']:.2f}x "
                      f"tokens/s, peak {ours['peak_gib']} vs {r.get('peak_gib')} GiB", flush=True)


if __name__ == "__main__":
    main()
