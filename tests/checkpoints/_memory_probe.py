"""Subprocess body of the memory test: load a checkpoint with quantization, print peak RSS growth.

Usage: python -m tests.checkpoints._memory_probe DIR WARMUP_DIR
Prints one JSON line: {"baseline": bytes, "peak_growth": bytes, "params_bytes": bytes}.
"""

import json
import sys


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def main() -> None:
    import jax.numpy as jnp

    import qlora_jax as qj

    from qlora_jax.lora import tree as lora_tree

    path, warmup = sys.argv[1], sys.argv[2]
    # Same tensor shapes, one layer: compiles every kernel the real load needs.
    qj.from_pretrained(warmup, dtype=jnp.bfloat16, quant=qj.QuantConfig())
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (peak RSS) to the current RSS
    baseline = _status("VmRSS")
    model, params = qj.from_pretrained(path, dtype=jnp.bfloat16, quant=qj.QuantConfig())
    peak = _status("VmHWM")
    print(json.dumps({"baseline": baseline, "peak_growth": peak - baseline,
                      "params_bytes": lora_tree.nbytes(params)}))


if __name__ == "__main__":
    main()
