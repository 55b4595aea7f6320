"""LoRA variants on the quickstart task: LoRA, rsLoRA, DoRA, PiSSA and LoftQ over one NF4 base.

Launch one variant and seed (from the repository root):

    python -m qlora_jax.launch --config experiments/lora_variants.py:dora \
        --workdir /tmp/qj_variants/dora_s0 --config.train.seed=0

Variants (the part after ``:``): ``lora`` (Kaiming A, zero B, scaling alpha/r), ``rslora``
(scaling alpha/sqrt(r)), ``dora`` (a trained magnitude per output feature), ``pissa`` (adapters
from the top-r singular vectors, the residual quantized), ``loftq`` (NF4 base and adapters fitted
together to the float weights, 1 round). Same budget for all: the quickstart (MiniLM +
stdlib_docstrings, 8 labels, a fresh head trained in full, NF4 base with double quantization),
r=16 alpha=32 on every encoder linear, 20 steps of 16 rows of 32 tokens, AdamW 2e-3 with a linear
decay; held-out loss on 128 validation docstrings. The notebook (notebooks/05_lora_variants.ipynb) runs each with seeds 0 and 1.

Hardware and expected result: 2 CPU cores, 1-4 min a run (shared cores) (the notebook's committed outputs
hold the measured held-out losses and wall times).
"""

import os

import ml_collections

from qlora_jax.train.config import load_experiment

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("lora", "rslora", "dora", "pissa", "loftq")


def get_config(variant: str = "lora") -> ml_collections.ConfigDict:
    """One variant of the comparison (``lora``, ``rslora``, ``dora``, ``pissa``, ``loftq``)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; use one of {', '.join(VARIANTS)} "
                         "(--config experiments/lora_variants.py:VARIANT)")
    c = load_experiment(os.path.join(HERE, "quickstart.py"))
    # Same budget for every variant: 20 updates of 16 rows of 32 tokens.
    c.train.steps = 20
    # Tokens a row.
    c.train.seq_len = 32
    # Log every this many steps.
    c.train.log_every = 10
    # Evaluate before training and at the end only.
    c.train.eval_every = 20
    # Held-out set: the first 2 batches of 64 validation docstrings.
    c.train.eval_batches = 2
    # No checkpoints (short runs).
    c.train.checkpoint_every = 0
    # Plain log lines (runs are launched from notebooks).
    c.train.progress = "lines"
    if variant == "rslora":
        # Scaling alpha / sqrt(r) = 8 instead of alpha / r = 2.
        c.lora.use_rslora = True
    elif variant == "dora":
        # A magnitude per output feature times the row-normalised W + s B A.
        c.lora.use_dora = True
    elif variant == "pissa":
        # Adapters from the principal singular vectors; the residual is quantized.
        c.lora.init = "pissa"
    elif variant == "loftq":
        # NF4 base and adapters fitted together to the float weights.
        c.lora.init = "loftq"
    return c
