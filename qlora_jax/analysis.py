"""Analysis helpers the research notebooks share: data types, quantization error, adapters.

    cb = nf4_codebook()                                  # NF4 from normal quantiles (QLoRA)
    rows = quantization_errors(weights, [("nf4", True), ("int4", False)])
    phi = subspace_similarity(a_r8, a_r64)               # LoRA paper, Section 7 [8, 64]
    emb = sentence_embeddings(model, params, tokenizer, texts)   # mean pooling [N, D]

Everything here works on numpy arrays (float64 where accuracy matters) and is independent of the
training code; the notebooks only call it.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from qlora_jax.quant import dequantize, quantize

# bitsandbytes' create_normal_map default: the outermost quantile level, chosen so that the
# extreme codes sit at the same distance from +-1 on both sides (QLoRA, Appendix/Eq. 4).
NF4_OFFSET = 0.9677083


def nf4_codebook(offset: float = NF4_OFFSET, bits: int = 4) -> np.ndarray:
    """Derives the k-bit NormalFloat codebook from quantiles of N(0, 1).

    The QLoRA construction: an exact zero, ``2**(k-1)`` positive levels and ``2**(k-1) - 1``
    negative levels. The positive levels are the standard-normal quantiles at ``2**(k-1) + 1``
    evenly spaced probabilities from ``offset`` down to 0.5 (the last, 0.5, is the zero and is
    dropped); the negative levels likewise with ``2**(k-1)`` probabilities. All levels are divided
    by the largest, so the codebook spans [-1, 1].

    Args:
      offset: probability of the outermost level (instead of 1, whose quantile is infinite).
      bits: k, the code width.

    Returns:
      float64 [2**k], sorted ascending, with -1, 0 and 1 exactly.
    """
    if not 0.5 < offset < 1.0:
        raise ValueError(f"offset={offset} must lie in (0.5, 1): it is the probability of the "
                         "outermost quantile")
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits} must be in 2..8")
    half = 2 ** (bits - 1)
    inv = statistics.NormalDist().inv_cdf
    positive = [inv(p) for p in np.linspace(offset, 0.5, half + 1)[:-1]]
    negative = [-inv(p) for p in np.linspace(offset, 0.5, half)[:-1]]
    values = np.sort(np.array(positive + [0.0] + negative, np.float64))
    return values / np.max(np.abs(values))


def block_normalized(w: np.ndarray, block_size: int = 64) -> np.ndarray:
    """Values of ``w`` divided by the absmax of their block (row-major flattened blocks).

    These are the numbers a 4-bit codebook has to represent: each lies in [-1, 1] and one of
    every block is exactly +-1. All-zero blocks are left out.

    Returns:
      float64 [n] (n = w.size minus the zero blocks' elements).
    """
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be >= 1")
    flat = np.asarray(w, np.float64).reshape(-1)
    pad = (-flat.size) % block_size
    blocks = np.concatenate([flat, np.zeros(pad)]).reshape(-1, block_size)
    absmax = np.max(np.abs(blocks), axis=1, keepdims=True)
    valid = np.ones_like(blocks, dtype=bool)
    if pad:
        valid[-1, block_size - pad:] = False
    keep = (absmax[:, 0] > 0)
    out = blocks[keep] / absmax[keep]
    return out[valid[keep]]


def expected_codebook_error(codebook: np.ndarray, values: np.ndarray) -> float:
    """Root-mean-square error of rounding ``values`` (in [-1, 1]) to the nearest codebook entry."""
    cb = np.sort(np.asarray(codebook, np.float64))
    v = np.asarray(values, np.float64).reshape(-1)
    idx = np.clip(np.searchsorted(cb, v), 1, cb.size - 1)
    nearest = np.where(np.abs(v - cb[idx - 1]) <= np.abs(cb[idx] - v), cb[idx - 1], cb[idx])
    return float(np.sqrt(np.mean((v - nearest) ** 2)))


@dataclasses.dataclass(frozen=True)
class ErrorRow:
    """Quantization error of one weight under one data type."""

    name: str
    qtype: str
    double_quant: bool
    num_params: int
    nbytes: int
    rel_error: float      # ||W - Q(W)||_F / ||W||_F
    mean_abs_error: float  # mean |W - Q(W)|
    ref_sq_norm: float     # ||W||_F^2 (to pool errors over weights)

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes / self.num_params

    @property
    def label(self) -> str:
        return self.qtype.upper() + ("+DQ" if self.double_quant else "")


def quantization_errors(weights: Mapping[str, np.ndarray],
                        settings: Iterable[tuple[str, bool]],
                        block_size: int = 64) -> list[ErrorRow]:
    """Quantizes every weight with every (qtype, double_quant) setting; errors in float64.

    Args:
      weights: name -> float array (any shape; quantized as stored, flattened row-major).
      settings: (qtype, double_quant) pairs, e.g. ``[("nf4", True), ("fp4", False)]``.
      block_size: elements a block.

    Returns:
      One row a (weight, setting), weights in the given order, settings inner.
    """
    settings = list(settings)
    if not weights:
        raise ValueError("weights is empty: pass at least one name -> array")
    rows = []
    for name, w in weights.items():
        w = np.asarray(w)
        ref = w.astype(np.float64)
        norm = float(np.linalg.norm(ref))
        for qtype, dq in settings:
            q = quantize(w, qtype, block_size, double_quant=dq)
            err = np.asarray(dequantize(q, impl="xla"), np.float64) - ref
            rel = float(np.linalg.norm(err)) / norm if norm > 0 else 0.0
            rows.append(ErrorRow(name, qtype, dq, int(w.size), int(q.nbytes), rel,
                                 float(np.mean(np.abs(err))), norm ** 2))
    return rows


def summarize_errors(rows: Sequence[ErrorRow]) -> list[dict[str, Any]]:
    """Totals a setting over all weights, in the order settings first appear.

    Returns:
      One dict a setting: ``label``, ``qtype``, ``double_quant``, ``num_params``, ``nbytes``,
      ``bits_per_param``, ``rel_error`` = ``sqrt(sum ||E||^2 / sum ||W||^2)`` over all weights
      together, ``mean_abs_error``, ``worst`` (largest single-weight relative error) and
      ``worst_name``.
    """
    out: dict[tuple[str, bool], dict[str, Any]] = {}
    for r in rows:
        d = out.setdefault((r.qtype, r.double_quant), dict(
            label=r.label, qtype=r.qtype, double_quant=r.double_quant, num_params=0, nbytes=0,
            _sq=0.0, _ref=0.0, _abs=0.0, worst=0.0, worst_name=""))
        d["num_params"] += r.num_params
        d["nbytes"] += r.nbytes
        d["_sq"] += r.rel_error ** 2 * r.ref_sq_norm
        d["_ref"] += r.ref_sq_norm
        d["_abs"] += r.mean_abs_error * r.num_params
        if r.rel_error > d["worst"]:
            d["worst"], d["worst_name"] = r.rel_error, r.name
    result = []
    for d in out.values():
        n = d.pop("num_params")
        sq, ref, ab = d.pop("_sq"), d.pop("_ref"), d.pop("_abs")
        result.append(dict(d, num_params=n, bits_per_param=8.0 * d["nbytes"] / n,
                           rel_error=float(np.sqrt(sq / ref)) if ref > 0 else 0.0,
                           mean_abs_error=ab / n))
    return result


def subspace_similarity(a1: np.ndarray, a2: np.ndarray, i: Optional[int] = None,
                        j: Optional[int] = None) -> Any:
    """Grassmann subspace similarity of two LoRA ``A`` matrices (LoRA paper, Section 7).

    ``phi(A1, A2, i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j)``, where ``U1`` and ``U2`` are
    the right-singular vectors of ``A1 [R1, d]`` and ``A2 [R2, d]`` (PEFT/PyTorch layout ``lora_A``;
    pass Flax ``lora_a [d, R]`` transposed). 1 means one subspace contains the other, 0 that they
    are orthogonal.

    Args:
      a1: ``[R1, d]``.
      a2: ``[R2, d]`` (same ``d``).
      i: top-i directions of ``a1`` (None: the whole grid).
      j: top-j directions of ``a2``.

    Returns:
      A float for given ``i`` and ``j``; else the grid float64 ``[R1, R2]`` with entry
      ``[i-1, j-1] = phi(i, j)``.
    """
    a1, a2 = np.asarray(a1, np.float64), np.asarray(a2, np.float64)
    if a1.ndim != 2 or a2.ndim != 2 or a1.shape[1] != a2.shape[1]:
        raise ValueError(f"A matrices must be [R, d] with the same d; got {a1.shape} and "
                         f"{a2.shape} (Flax lora_a is [d, R]: pass its transpose)")
    u1 = np.linalg.svd(a1, full_matrices=False)[2].T  # [d, R1], columns by singular value
    u2 = np.linalg.svd(a2, full_matrices=False)[2].T
    overlap = (u1.T @ u2) ** 2                         # [R1, R2]
    grid = np.cumsum(np.cumsum(overlap, axis=0), axis=1)
    mins = np.minimum.outer(np.arange(1, u1.shape[1] + 1), np.arange(1, u2.shape[1] + 1))
    grid = grid / mins
    if i is None and j is None:
        return grid
    if i is None or j is None or not (1 <= i <= u1.shape[1] and 1 <= j <= u2.shape[1]):
        raise ValueError(f"i={i}, j={j} must both be given, 1 <= i <= {u1.shape[1]}, "
                         f"1 <= j <= {u2.shape[1]}")
    return float(grid[i - 1, j - 1])


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings by mean pooling over the attended tokens: ``[B, T, D] -> [B, D]``."""
    h = np.asarray(hidden, np.float64)
    m = np.asarray(mask, np.float64)[..., None]
    return (h * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1.0)


def sentence_embeddings(model: Any, params: Any, tokenizer: Any, texts: Sequence[str],
                        seq_len: int = 128, batch_size: int = 32) -> np.ndarray:
    """Mean-pooled last hidden states of an encoder (sentence-transformers style), ``[N, D]``."""
    import jax

    apply = jax.jit(lambda p, ids, m: model.apply({"params": p}, ids, attention_mask=m))
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start:start + batch_size])
        n = len(chunk)
        chunk += [""] * (batch_size - n)  # one compiled shape
        enc = tokenizer.encode_padded(chunk, seq_len)
        hidden = apply(params, enc["input_ids"], enc["attention_mask"])
        out.append(mean_pool(np.asarray(hidden), enc["attention_mask"])[:n])
    return np.concatenate(out)


def cosine_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows of ``x [N, D]`` and ``y [N, D]``, ``[N]``."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {x.shape} vs {y.shape}")
    return (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl`` (training steps and evaluations), in order."""
    import json
    import os

    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: has the run in {workdir} started?")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def run_experiment(config: str, workdir: str, overrides: Optional[Mapping[str, Any]] = None,
                   repo_root: Optional[str] = None, timeout_s: float = 3600.0) -> dict[str, Any]:
    """Runs ``python -m qlora_jax.launch --config CONFIG --workdir WORKDIR --config.K=V ...``.

    The launcher's summary (its last stdout line, JSON) is kept in ``WORKDIR/summary.json``; a
    workdir that already holds one is not run again, so a notebook re-executed over finished runs
    only reads them.

    Args:
      config: the config argument (``experiments/NAME.py`` or ``experiments/NAME.py:ARG``),
        relative to the directory the launcher runs in.
      workdir: the run directory.
      overrides: dotted config keys (without ``config.``) and values, e.g. ``{"lora.r": 8}``.
      repo_root: directory to launch from (default: the current directory when it holds
        ``config``, else the source checkout holding this package).
      timeout_s: wall-clock limit of the run.

    Returns:
      The summary: ``eval_before``/``eval_after`` (held-out metrics), ``trainable_params``,
      ``peak_memory_bytes`` (peak RSS of the run's process on CPU), ``wall_s``, ...

    Raises:
      RuntimeError: the launcher failed (its exit code and the end of its output).
    """
    import json
    import os
    import subprocess
    import sys

    path = os.path.join(workdir, "summary.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    root = repo_root
    if root is None:
        here = os.getcwd()
        checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        config_file = config.partition(":")[0]
        root = here if os.path.isfile(os.path.join(here, config_file)) else checkout
    cmd = [sys.executable, "-m", "qlora_jax.launch", f"--config={config}", f"--workdir={workdir}"]
    for key, value in (overrides or {}).items():
        cmd.append(f"--config.{key}={value}")
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-2000:]
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{tail}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    summary["command"] = " ".join(cmd[1:])
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1, sort_keys=True)
    return summary


def step_times(records: Sequence[Mapping[str, Any]]) -> list[float]:
    """Seconds a step of each logged training window (``1 / steps_per_s``), first window dropped
    when there are others (it holds the compilation)."""
    times = [1.0 / r["steps_per_s"] for r in records if r.get("steps_per_s")]
    return times[1:] if len(times) > 1 else times


def load_config(spec: str, repo_root: Optional[str] = None) -> Any:
    """An experiment config from ``"experiments/NAME.py[:ARG]"`` (see
    ``qlora_jax.train.config.load_experiment``)."""
    from qlora_jax.train.config import load_experiment

    return load_experiment(spec, repo_root)


def adapter_matrices(adapter_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The LoRA factors of a PEFT adapter directory, by module name.

    Returns:
      module name (e.g. ``"bert.encoder.layer.0.attention.self.query"``) -> ``(A [R, in],
      B [out, R])`` in PEFT/PyTorch layout, float64.
    """
    import os

    from safetensors.numpy import load_file

    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: is {adapter_dir} a PEFT adapter folder?")
    tensors = load_file(path)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[:-len(".lora_A.weight")]
        b = tensors[name + ".lora_B.weight"]
        out[name.removeprefix("base_model.model.")] = (a.astype(np.float64), b.astype(np.float64))
    if not out:
        raise ValueError(f"{path} holds no lora_A/lora_B weights")
    return out
