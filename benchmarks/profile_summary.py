"""Device time of a profiled step, by kernel and by category, from a ``jax.profiler`` trace.

    python -m benchmarks.profile_summary TRACE_DIR [--steps N] [--top 40]

Reads the Perfetto JSON (``perfetto_trace.json.gz``) that ``jax.profiler.trace(...,
create_perfetto_trace=True)`` writes, keeps the events of the device processes (``/device:...``),
and sums their durations by kernel name and by category (GEMM, 4-bit kernels, attention,
elementwise/reduction fusions, copies, collectives). Divide by ``--steps`` (the steps run under
the trace) for per-step figures. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
from typing import Any, Iterable

#: (category, regex on the lower-cased kernel name), first match wins.
CATEGORIES = (
    ("4bit_kernels", r"qlora_"),
    ("attention", r"cudnn|fmha|flash|attention|sdpa"),
    ("collective", r"nccl|all_reduce|all-reduce|allreduce|all_gather|all-gather|reduce_scatter|"
                   r"reduce-scatter|collective"),
    ("copy", r"memcpy|memset|copy"),
    ("gemm", r"gemm|xmma|cutlass|sm90|sm80|cublas|matmul|dot"),
    ("fusion", r"fusion|loop_|input_|reduce|transpose|concatenate|dynamic|slice|convert|triton"),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, pattern in CATEGORIES:
        if re.search(pattern, low):
            return cat
    return "other"


def find_trace(path: str) -> str:
    if os.path.isfile(path):
        return path
    hits = sorted(glob.glob(os.path.join(path, "**", "perfetto_trace.json.gz"), recursive=True))
    if not hits:
        raise SystemExit(f"no perfetto_trace.json.gz under {path}")
    return hits[-1]


def load_events(path: str) -> tuple[list[dict[str, Any]], dict[int, str]]:
    with gzip.open(find_trace(path), "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    return events, names


def device_events(events: Iterable[dict[str, Any]], names: dict[int, str]) -> list[dict[str, Any]]:
    """Complete events of device processes (GPU/TPU streams), not host threads."""
    dev = {pid for pid, n in names.items() if "/device:" in n and "host" not in n.lower()}
    return [e for e in events if e.get("ph") == "X" and e.get("pid") in dev and "dur" in e]


def summarize(path: str, steps: int = 1, top: int = 40) -> dict[str, Any]:
    events, names = load_events(path)
    dev = device_events(events, names)
    if not dev:
        return {"error": "no device events in the trace", "processes": sorted(set(names.values()))}
    by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    by_cat: dict[str, float] = collections.defaultdict(float)
    example_args: dict[str, Any] = {}
    for e in dev:
        n = e["name"]
        by_name[n][0] += e["dur"]
        by_name[n][1] += 1
        by_cat[category(n)] += e["dur"]
        if n not in example_args and e.get("args"):
            example_args[n] = {k: str(v)[:160] for k, v in e["args"].items()}
    total = sum(by_cat.values())
    t0 = min(e["ts"] for e in dev)
    t1 = max(e["ts"] + e["dur"] for e in dev)
    rows = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "trace": find_trace(path),
        "steps": steps,
        "device_busy_ms_per_step": round(total / 1e3 / steps, 3),
        "device_span_ms_per_step": round((t1 - t0) / 1e3 / steps, 3),
        "by_category_ms_per_step": {k: round(v / 1e3 / steps, 3)
                                    for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": n[:140], "ms_per_step": round(t / 1e3 / steps, 3),
                         "calls_per_step": c / steps, "category": category(n),
                         "args": example_args.get(n)} for n, (t, c) in rows],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace", help="a trace directory (searched) or a perfetto_trace.json.gz")
    p.add_argument("--steps", type=int, default=1, help="steps run under the trace")
    p.add_argument("--top", type=int, default=40)
    args = p.parse_args()
    print(json.dumps(summarize(args.trace, args.steps, args.top), indent=1))


if __name__ == "__main__":
    main()
