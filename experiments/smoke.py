"""Smoke run: QLoRA on a tiny random Llama (built in code, no checkpoint), seconds on a CPU.

Launch (from the repository root):

    python -m qlora_jax.launch --config experiments/smoke.py --workdir /tmp/qj_smoke

Hardware: any CPU (2 cores are plenty). Expected result: 15-40 s in all, most of it
compilation; 40 steps of 8 packed rows (160 examples in 110 rows); the response-only training loss falls from ~6.5 (about ln 512,
the vocabulary) to ~1, held-out loss from ~6.5 to ~0.7 and held-out next-token accuracy on the
response tokens from ~0.02 to ~0.65 (about 30 CPU-seconds); the workdir ends with config.json,
metrics.jsonl, eval.jsonl, TensorBoard events, checkpoints/ (steps 30 and 40) and adapter/
(PEFT). Running the same command again finds the run complete and only re-exports the
adapter. Tests use this config (tests/train/test_loop.py).

Data: experiments/data/smoke.{train,eval}.jsonl (prompt/response records made from the shipped
stdlib_docstrings dataset by experiments/data/make_smoke_data.py) and the 512-token BPE tokenizer
experiments/data/smoke_tokenizer/ (made by the same script).
"""

import os

import ml_collections

from qlora_jax.train.defaults import default_config

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config() -> ml_collections.ConfigDict:
    """The smoke experiment (the defaults of qlora_jax.train.defaults, and what differs)."""
    c = default_config()
    # The 512-token BPE tokenizer made from the smoke data.
    c.model.tokenizer = os.path.join(HERE, "data", "smoke_tokenizer")
    with c.unlocked():
        # Config.json fields of the random model (a 2-layer Llama over the 512-token smoke
        # vocabulary), built because model.path is "".
        c.model.random = ml_collections.ConfigDict(dict(
            model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, tie_word_embeddings=False, rms_norm_eps=1e-6))
    # The random model's LM head is trained in full, so that logits can sharpen.
    c.lora.modules_to_save = ("lm_head",)
    # Prompt/response records made from the shipped stdlib_docstrings dataset.
    c.data.path = os.path.join(HERE, "data", "smoke.train.jsonl")
    c.data.eval_path = os.path.join(HERE, "data", "smoke.eval.jsonl")
    # A high learning rate: a few dozen steps must visibly train a random model.
    c.optim.learning_rate = 1e-2
    # Cosine decay to a tenth of the peak after 4 warmup steps.
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 4
    c.optim.end_lr_ratio = 0.1
    # Packed rows: the examples (24-81 tokens) fill 81% of the rows instead of 54%.
    c.data.packing = True
    # 40 steps of 8 rows of 96 tokens.
    c.train.steps = 40
    c.train.batch_size = 8
    c.train.seq_len = 96
    # Log every 5 steps, a checkpoint every 10, evaluate every 20.
    c.train.log_every = 5
    c.train.checkpoint_every = 10
    c.train.eval_every = 20
    return c
