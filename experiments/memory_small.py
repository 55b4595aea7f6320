"""Memory of one train step on a CPU: full fine-tuning vs LoRA vs QLoRA (notebook 03).

Launch one method (from the repository root):

    python -m qlora_jax.launch --config experiments/memory_small.py:qlora \
        --workdir /tmp/qj_mem/qlora

Methods (after ``:``): ``qlora`` (NF4 + double quant base, LoRA r=8 on every linear), ``lora``
(float32 base, same adapters) and ``full`` (every weight trained: all modules in modules_to_save,
no adapters). The model is the smoke experiment's random Llama made larger (D=512, F=1408, 4
layers, 8 heads, 4 KV heads, 512-token vocabulary: 12.3M parameters) so that weights and optimizer
state stand out from the runtime's own memory; float32 throughout. The notebook
(notebooks/03_memory.ipynb) compiles the train step of each method with
``qlora_jax.memory.compiled_step_memory`` (XLA's buffer assignment) and compares it with
``qlora_jax.memory.finetune_memory``; launched, each run also reports the process's peak RSS.

Hardware and expected result: any CPU, ~1 min a run (10 steps; ~2 s a step on 2 busy cores).
Measured (2 CPU cores, 2026-11-22): state 6.8 MiB frozen + 6.4 MiB adapters and AdamW (QLoRA),
46 + 6.4 MiB (LoRA), 47 MiB weights + 94 MiB AdamW (full); XLA's step peak 236 / 279 / 413 MiB
(the difference full - LoRA in temporaries is the 47 MiB of gradients); peak RSS of the launched
run 1019 / 1057 / 1150 MiB.
"""

import os

import ml_collections

from qlora_jax.train.config import load_experiment

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("qlora", "lora", "full")
# Every module of the Llama: naming them all in modules_to_save trains every weight.
ALL_MODULES = ("embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
               "down_proj", "input_layernorm", "post_attention_layernorm", "norm", "lm_head")


def get_config(method: str = "qlora") -> ml_collections.ConfigDict:
    """One method (``qlora``, ``lora`` or ``full``) on the larger random Llama."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)} "
                         "(--config experiments/memory_small.py:METHOD)")
    c = load_experiment(os.path.join(HERE, "smoke.py"))
    # A larger random Llama than the smoke run's (12.3M parameters).
    c.model.random.hidden_size = 512
    c.model.random.intermediate_size = 1408
    c.model.random.num_hidden_layers = 4
    c.model.random.num_attention_heads = 8
    c.model.random.num_key_value_heads = 4
    # No dropout: the step is the same function for every method.
    c.lora.dropout = 0.0
    # A few steps: the memory of a step, not a result.
    c.train.steps = 10
    # Log every step.
    c.train.log_every = 5
    # No evaluation and one checkpoint.
    c.train.eval_every = 0
    c.train.checkpoint_every = 0
    # Plain log lines.
    c.train.progress = "lines"
    if method == "qlora":
        return c
    # Float32 base for the 16-bit-style methods (the CPU computes in float32).
    c.quant.enabled = False
    if method == "full":
        # Every module trained in full; a saved module gets no adapter.
        c.lora.target_modules = "lm_head"
        c.lora.modules_to_save = ALL_MODULES
    return c
