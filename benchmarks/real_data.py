"""Useful (non-padding) tokens/s on instruction data of real lengths: padded, bucketed, packed, peer.

    python -m benchmarks.real_data                 # llama-8b, rows of 2048, r16, both length sets
    python -m benchmarks.real_data --quick         # llama-1b, real lengths only, 3 steps (< 3 min)

The same examples (one fixed shuffle) are trained on as
(a) ``padded``: one example a row of ``--seq`` tokens (``data.packing=False``),
(b) ``bucketed``: one example a row, rows grouped by length and padded to the smallest of
    ``--buckets`` that fits (``data.length_buckets``; each bucket compiles once),
(c) ``packed``: several examples a row (``data.packing=True``, best-fit decreasing, segment-masked
    attention),
(d) ``peer``: transformers + bitsandbytes NF4 + PEFT (benchmarks/peer_bnb.py's model, full
    gradient checkpointing) fed as many examples a step as (c)'s rows hold on average, padded to the
    longest of the batch (what transformers' default collators, e.g. DataCollatorForSeq2Seq, do),
and (e) ``dense``: benchmarks/train_step.py's step on random [B, seq] rows without padding, the
reference of the ">= 90% of dense" target. Each of (a)-(c) runs the library's own data path
(`InstructDataset` + `TrainLoader` + the launcher's `Task`), all with ``--remat`` and a chunked loss.

Length sets:
- ``stdlib_docstrings``: the shipped dataset qlora_jax/data/assets/stdlib_docstrings.train.jsonl
  (1,834 Python docstrings) as prompt/response records (``"Docstring: {text}\\nTopic:"`` -> the
  module family, as experiments/data/make_smoke_data.py writes them, but the whole docstring),
  tokenised with experiments/data/smoke_tokenizer (512-token BPE); real token ids and loss masks
  (median 66 tokens, p99 ~225).
- ``synthetic``: log-normal lengths, median 250, p99 ~1,800 tokens (sigma 0.85), clipped to
  [8, seq]; random token ids; loss on the last 60% of each example. Labelled synthetic.

``useful_tokens_per_s`` counts the tokens of examples (not padding) a second of training steps
(median step time, batches already on the device). Every measurement prints one JSON line and is
appended to ``--out/real_data.jsonl``; each system runs in its own subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LENGTH_SETS = ("stdlib_docstrings", "synthetic")
LAYOUTS = ("padded", "bucketed", "packed")


# -- the examples -------------------------------------------------------------------------------

def examples(name: str, seq: int, vocab: int, count: int = 4000, seed: int = 0
             ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(ids, learned) per example of a length set (see the module docstring)."""
    rng = np.random.default_rng(seed)
    if name == "stdlib_docstrings":
        from qlora_jax import data
        from qlora_jax.data.builtin import builtin_path

        tok = data.load_tokenizer(os.path.join(ROOT, "experiments", "data", "smoke_tokenizer"))
        with open(builtin_path("stdlib_docstrings", "train"), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        records = [{"prompt": f"Docstring: {r['text']}\nTopic:", "response": " " + r["label_name"]}
                   for r in rows]
        ids, learned, _, _ = data.tokenize_records(records, "prompt_response", tok, seq)
        return ids, learned
    if name == "synthetic":
        lengths = np.clip(np.round(250 * np.exp(0.85 * rng.standard_normal(count))), 8, seq)
        ids, learned = [], []
        for n in lengths.astype(int):
            ids.append(rng.integers(3, vocab, n).astype(np.int32))
            flags = np.zeros(n, bool)
            flags[int(0.4 * n):] = True
            learned.append(flags)
        return ids, learned
    raise SystemExit(f"unknown length set {name!r}; choose from {LENGTH_SETS}")


def peer_batches(lengths: np.ndarray, order: np.ndarray, per_step: int, steps: int
                 ) -> list[list[int]]:
    """The peer's batches: ``per_step`` consecutive examples of ``order`` (lengths only)."""
    return [[int(lengths[i]) for i in order[s * per_step:(s + 1) * per_step]]
            for s in range(steps)]


# -- ours ---------------------------------------------------------------------------------------

def run_ours(shape_name: str, length_set: str, layouts: tuple[str, ...], batch: int, seq: int,
             r: int, steps: int, remat: str, loss_chunk: int, buckets: tuple[int, ...],
             impl: str = "auto") -> list[dict[str, Any]]:
    """Times (a)-(c) on one model (built once); returns one result a layout."""
    import jax
    import jax.numpy as jnp
    import optax

    import qlora_jax as qj
    from benchmarks.train_step import Shape, random_params
    from qlora_jax import data
    from qlora_jax.models.llama import LlamaForCausalLM
    from qlora_jax.train import state as tstate
    from qlora_jax.train import step as tstep
    from qlora_jax.train.task import Task

    shape = Shape.get(shape_name)
    cfg = shape.llama_config(seq)
    model = LlamaForCausalLM(cfg, lora=qj.LoraConfig(r=r, alpha=16, target_modules="all-linear"),
                             quant=qj.QuantConfig(), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                             impl=impl, remat=remat)
    params = random_params(model, shape, r, seed=0)
    tx = optax.adamw(2e-4)
    state = tstate.create_state(params, tx, seed=0)
    del params
    ids, learned = examples(length_set, seq, shape.vocab)
    out = []
    for layout in layouts:
        ds = data.InstructDataset(ids, learned, seq, pad_id=0, packing=layout == "packed")
        loader = data.TrainLoader(ds, batch, seed=0,
                                  length_buckets=buckets if layout == "bucketed" else None)
        result = dict(system="qlora_jax", layout=layout, lengths=length_set, remat=remat,
                      loss_chunk=loss_chunk, rows_per_step=batch,
                      examples=len(ds), device=jax.devices()[0].device_kind, jax=jax.__version__)
        try:
            task = Task(model, "causal_lm", loss_chunk, right_padded=True,
                        packed=layout == "packed")
            step = tstep.make_train_step(task, tx, optax.constant_schedule(2e-4), dropout=False)
            batches = [next(loader) for _ in range(steps + 1)]
            shapes = sorted({b["input_ids"].shape[1] for b in batches})
            t0 = time.perf_counter()
            compiled, peaks = {}, {}
            for t in shapes:  # compile every row length once, outside the timing
                b = jax.device_put(next(b for b in batches if b["input_ids"].shape[1] == t))
                compiled[t] = step.lower(state, b).compile()
                mem = compiled[t].memory_analysis()
                if mem is not None:
                    peaks[t] = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
                state, m = compiled[t](state, b)
                jax.block_until_ready(m["loss"])
            compile_s = time.perf_counter() - t0
            on_device = [jax.device_put(b) for b in batches[1:]]
            times, tokens, slots, per_row = [], 0.0, 0, []
            for b, host in zip(on_device, batches[1:]):
                t = time.perf_counter()
                state, m = compiled[host["input_ids"].shape[1]](state, b)
                jax.block_until_ready(m["loss"])
                times.append(time.perf_counter() - t)
                tokens += float(host["attention_mask"].sum())
                slots += host["input_ids"].size
                per_row += [len(np.unique(s[s > 0])) for s in host["segment_ids"]]
            total = float(np.sum(times))
            stats = (jax.devices()[0].memory_stats() or {})
            result.update(
                useful_tokens_per_s=round(tokens / total, 1),
                slots_per_s=round(slots / total, 1),
                padding_fraction=round(1 - tokens / slots, 4),
                examples_per_row=round(float(np.mean(per_row)), 2),
                step_s=round(float(np.median(times)), 4), steps=len(times),
                row_lengths=shapes, compile_s=round(compile_s, 1),
                xla_peak_gib={t: round(p / 2**30, 3) for t, p in peaks.items() if p},
                peak_gib=round(stats.get("peak_bytes_in_use", 0) / 2**30, 3),
                loss_last=round(float(m["loss"]), 4))
        except Exception as e:  # noqa: BLE001 - a layout that fails is reported, not fatal
            result["error"] = " ".join(f"{type(e).__name__}: {e}".split())[:400]
        out.append(result)
    return out


# -- the peer -----------------------------------------------------------------------------------

def run_peer(shape_name: str, length_set: str, per_step: int, seq: int, r: int, steps: int
             ) -> dict[str, Any]:
    """(d): the transformers + bitsandbytes + PEFT peer, batches padded to their longest."""
    import torch
    import bitsandbytes as bnb
    import peft

    from benchmarks.peer_bnb import _build, with_lora
    from benchmarks.train_step import Shape

    shape = Shape.get(shape_name)
    ids, learned = examples(length_set, seq, shape.vocab)
    order = np.random.default_rng([0, 0]).permutation(len(ids))  # the loaders' epoch-0 order
    dev = "cuda"
    model = _build(shape, seq, dev)
    model, opt = with_lora(model, r)
    torch.cuda.reset_peak_memory_stats()
    times, tokens, slots = [], 0, 0
    for s in range(steps + 2):
        chosen = order[(s * per_step) % len(ids):][:per_step]
        longest = max(len(ids[i]) for i in chosen)
        x = torch.zeros((len(chosen), longest), dtype=torch.long)
        mask = torch.zeros_like(x)
        labels = torch.full_like(x, -100)
        for row, i in enumerate(chosen):
            n = len(ids[i])
            x[row, :n] = torch.from_numpy(ids[i].astype(np.int64))
            mask[row, :n] = 1
            lab = torch.from_numpy(ids[i].astype(np.int64))
            lab[~torch.from_numpy(learned[i])] = -100
            labels[row, :n] = lab
        x, mask, labels = x.to(dev), mask.to(dev), labels.to(dev)
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=x, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if s >= 2:  # two warm-up steps
            times.append(time.perf_counter() - t)
            tokens += int(mask.sum())
            slots += mask.numel()
    total = float(np.sum(times))
    return dict(system="transformers+bitsandbytes+peft", layout="pad_to_longest",
                lengths=length_set, remat="full", examples_per_step=per_step,
                useful_tokens_per_s=round(tokens / total, 1), slots_per_s=round(slots / total, 1),
                padding_fraction=round(1 - tokens / slots, 4),
                step_s=round(float(np.median(times)), 4), steps=len(times),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3),
                loss_last=round(float(loss), 4), device=torch.cuda.get_device_name(),
                torch=torch.__version__, bitsandbytes=bnb.__version__, peft=peft.__version__)


# -- driver -------------------------------------------------------------------------------------

def _child(args: argparse.Namespace) -> None:
    common = dict(shape=args.shape, seq=args.seq, rank=args.rank)
    if args.system == "ours":
        results = run_ours(args.shape, args.lengths, tuple(args.layouts.split(",")), args.batch,
                           args.seq, args.rank, args.steps, args.remat, args.loss_chunk,
                           tuple(int(b) for b in args.buckets.split(",")))
    elif args.system == "peer":
        results = [run_peer(args.shape, args.lengths, args.per_step, args.seq, args.rank,
                            args.steps)]
    else:
        raise SystemExit(f"unknown system {args.system!r}")
    for res in results:
        print("RESULT " + json.dumps({**common, **res}), flush=True)


def _spawn(cmd: list[str], fallback: dict[str, Any]) -> list[dict[str, Any]]:
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    lines = [json.loads(l[len("RESULT "):]) for l in proc.stdout.splitlines()
             if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return [dict(fallback, error=f"exit code {proc.returncode} (traceback above); stdout: "
                                     f"{proc.stdout[-500:]}")]
    return lines


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default=None, help="llama-8b (llama-1b with --quick)")
    p.add_argument("--seq", type=int, default=2048, help="row length T")
    p.add_argument("--batch", type=int, default=1, help="rows a step (B) for (a)-(c) and dense")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=None, help="timed steps (10; 3 with --quick)")
    p.add_argument("--remat", default="full")
    p.add_argument("--loss-chunk", type=int, default=512)
    p.add_argument("--buckets", default="256,512,1024,2048", help="row lengths of (b)")
    p.add_argument("--lengths", default=None, help=f"comma list of {LENGTH_SETS}")
    p.add_argument("--skip", default="", help="comma list of systems to leave out: "
                                               "ours, peer, dense")
    p.add_argument("--quick", action="store_true",
                   help="llama-1b, stdlib_docstrings only, 3 timed steps (under 3 minutes)")
    p.add_argument("--out", default="benchmarks/out")
    p.add_argument("--system", default=None, help=argparse.SUPPRESS)
    p.add_argument("--layouts", default=",".join(LAYOUTS),
                   help=f"comma list of our layouts to run, of {LAYOUTS}")
    p.add_argument("--per-step", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.shape = args.shape or ("llama-1b" if args.quick else "llama-8b")
    args.steps = args.steps or (3 if args.quick else 10)
    args.lengths = args.lengths or ("stdlib_docstrings" if args.quick else ",".join(LENGTH_SETS))
    if args.system:
        _child(args)
        return
    os.makedirs(args.out, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    me = [sys.executable, "-m", "benchmarks.real_data", "--shape", args.shape, "--seq",
          str(args.seq), "--rank", str(args.rank), "--steps", str(args.steps)]
    results = []

    def record(rows: list[dict[str, Any]]) -> None:
        for res in rows:
            results.append(res)
            print(json.dumps(res), flush=True)
            with open(os.path.join(args.out, "real_data.jsonl"), "a") as f:
                f.write(json.dumps(res) + "\n")

    if "dense" not in skip:
        rows = _spawn([sys.executable, "-m", "benchmarks.train_step", "--system", "ours",
                       "--shape", args.shape, "--batch", str(args.batch), "--seq", str(args.seq),
                       "--rank", str(args.rank), "--steps", str(args.steps), "--remat",
                       args.remat, "--loss-chunk", str(args.loss_chunk), "--impl", "auto",
                       "--adapter-dtype", "float32", "--mesh", "1,1,1", "--attention", "auto"],
                      dict(system="qlora_jax"))
        record([dict(r, layout="dense") for r in rows])
    for lengths in args.lengths.split(","):
        ours = []
        if "ours" not in skip:
            ours = _spawn(me + ["--system", "ours", "--lengths", lengths, "--batch",
                                str(args.batch), "--remat", args.remat, "--loss-chunk",
                                str(args.loss_chunk), "--buckets", args.buckets,
                                "--layouts", args.layouts],
                          dict(system="qlora_jax", lengths=lengths))
            record(ours)
        if "peer" not in skip:
            packed = next((r for r in ours if r.get("layout") == "packed" and "error" not in r),
                          None)
            per_step = (max(1, round(packed["examples_per_row"] * args.batch)) if packed
                        else _mean_per_row(lengths, args.seq, args.batch))
            record(_spawn(me + ["--system", "peer", "--lengths", lengths, "--per-step",
                                str(per_step)],
                          dict(system="transformers+bitsandbytes+peft", lengths=lengths)))
    _print_ratios(results)


def _mean_per_row(lengths: str, seq: int, batch: int) -> int:
    """Examples a packed row holds on average (when ours did not run)."""
    from qlora_jax.data.packing import pack_rows

    ids, _ = examples(lengths, seq, 128256)
    n = np.array([len(x) for x in ids])
    rows = pack_rows(n, np.random.default_rng([0, 0]).permutation(len(n)), seq)
    return max(1, round(len(n) / len(rows) * batch))


def _print_ratios(results: list[dict[str, Any]]) -> None:
    dense = next((r for r in results if r.get("layout") == "dense" and "tokens_per_s" in r), None)
    for lengths in LENGTH_SETS:
        got = {r["layout"]: r for r in results if r.get("lengths") == lengths
               and "useful_tokens_per_s" in r}
        packed = got.get("packed")
        if packed is None:
            continue
        line = [f"{lengths}: packed {packed['useful_tokens_per_s']:,.0f} useful tokens/s"]
        if dense:
            line.append(f"{packed['useful_tokens_per_s'] / dense['tokens_per_s']:.1%} of dense "
                        f"({dense['tokens_per_s']:,.0f})")
        for other in ("padded", "bucketed", "pad_to_longest"):
            if other in got:
                line.append(f"{packed['useful_tokens_per_s'] / got[other]['useful_tokens_per_s']:.2f}x "
                            f"{'peer' if other == 'pad_to_longest' else other}")
        print("; ".join(line), flush=True)


if __name__ == "__main__":
    main()
