"""LoRA rank sweep on the quickstart task (notebook 02; the LoRA paper's Table 6 / Section 7).

Launch one point of the sweep (from the repository root):

    python -m qlora_jax.launch --config experiments/lora_rank.py --workdir /tmp/qj_rank/qv_r8 \
        --config.lora.r=8 --config.lora.target_modules='.*\\.(query|value)'

The notebook (notebooks/02_lora_rank.ipynb) runs r = 1, 2, 4, 8, 64 with adapters on query and
value (regex ``.*\\.(query|value)``) and on query only (``.*\\.query``), one workdir each, and
reads their summaries, metrics.jsonl and adapter/ (PEFT files: the A and B matrices for the
subspace similarity).

Setup: the quickstart (MiniLM all-MiniLM-L6-v2 + the stdlib_docstrings 8-way classification,
fresh classification head trained in full) with a float32 base (no quantization: the rank sweep
studies LoRA itself, and the float base is faster on a CPU), lora_alpha fixed at 16 for every rank
as in the LoRA paper (scaling alpha / r), 60 steps of 16 rows of 48 tokens (about half an epoch).

Hardware and expected result: 2 CPU cores, 1-3 min a run. Measured (2026-11-22, one seed):
validation accuracy from 0.113 to 0.43 (r=1) and 0.53-0.59 (r=2..64) with query+value, loss
2.080 -> 1.648 (r=1) and 1.579-1.595 (r=2..64, no trend in r); query alone 0.609-0.613, loss
1.898-1.906 for every r (the adapter barely moves the model in this budget; the head learns).
Subspace similarity r=8 vs r=64 (mean of 12 modules): phi(1,1) = 0.57 (A), 0.86 (B), random 0.004.
"""

import os

import ml_collections

from qlora_jax.train.config import load_experiment

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config() -> ml_collections.ConfigDict:
    """The rank-sweep experiment (one point; override lora.r and lora.target_modules)."""
    c = load_experiment(os.path.join(HERE, "quickstart.py"))
    # Float32 frozen base: the sweep studies the adapter, not the 4-bit data type.
    c.quant.enabled = False
    # Adapter rank R (the sweep: 1, 2, 4, 8, 64).
    c.lora.r = 8
    # Fixed alpha for every rank, as in the LoRA paper (scaling alpha / r).
    c.lora.alpha = 16.0
    # The LoRA paper's attention weights W_q and W_v, as a full-match regex on the module name
    # (the sweep also runs ".*\\.query" alone).
    c.lora.target_modules = r".*\.(query|value)"
    # A short run: 60 updates of 16 rows (about half an epoch of the 1,834 training texts).
    c.train.steps = 60
    # Tokens a row (most docstring openings fit in 48 tokens).
    c.train.seq_len = 48
    # Log every this many steps.
    c.train.log_every = 10
    # Evaluate before training and at the end only.
    c.train.eval_every = 60
    # One checkpoint at the end.
    c.train.checkpoint_every = 0
    # Plain log lines (runs are launched from notebooks).
    c.train.progress = "lines"
    return c
