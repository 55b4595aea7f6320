"""The reference QLoRA recipe (Dettmers et al. 2023, artidoro/qlora defaults) on a Llama-family model.

Launch (from the repository root; any Llama, Mistral or Qwen2 checkpoint directory with
config.json, *.safetensors and tokenizer.json, and an instruction JSONL file):

    python -m qlora_jax.launch --config experiments/llama_qlora.py --workdir runs/llama_qlora \
        --config.model.path=/models/Llama-3.2-1B --config.data.path=/data/alpaca.jsonl

The recipe: frozen base quantized to NF4 with double quantization while loading, bf16 compute;
LoRA r=64, alpha=16, dropout 0.05 on every linear layer except the LM head; AdamW (32-bit
state, kept in pinned host memory between steps: the counterpart of paged AdamW), lr 2e-4,
constant schedule after 3% warmup, no weight decay, max grad norm 0.3; batch 16 as 16
micro-batches of 1 (gradient accumulation); gradient checkpointing (remat "full"); loss on the
response tokens only (prompt tokens masked); rows of 512 tokens packed with several examples each
(data.packing: instruction data is mostly short, so a padded row is mostly padding; attention and
loss stay within each example, and a step sees more examples than the original's 16). Records: Alpaca instruction/input/output,
prompt/response, or chat messages (format detected).

Hardware and expected result: one GPU with >= 16 GB for 7-8B models (about 6 GB for a 1B
model). On Alpaca-style data the response-only training loss falls from ~1.6-2.0 to ~1.0-1.2
within the first few hundred steps for a Llama-3-8B class model; evaluation every 250 steps
reports held-out loss and perplexity when --config.data.eval_path is given. On a CPU this
config is impractically slow for real checkpoints; use experiments/smoke.py there.
"""

import ml_collections

from qlora_jax.train.defaults import default_config


def get_config() -> ml_collections.ConfigDict:
    """The reference QLoRA recipe; model.path and data.path must be given."""
    c = default_config()
    # bfloat16 compute and frozen float weights.
    c.model.dtype = "bfloat16"
    # Gradient checkpointing of every layer.
    c.model.remat = "full"
    # Adapters r=64 (alpha 16 and dropout 0.05 are the defaults).
    c.lora.r = 64
    # 3% warmup, then constant.
    c.optim.warmup_ratio = 0.03
    # Max grad norm 0.3.
    c.optim.max_grad_norm = 0.3
    # AdamW state in pinned host memory between steps (the counterpart of paged AdamW).
    c.optim.offload_state = True
    # Rows packed with several examples each (attention and loss stay within an example).
    c.data.packing = True
    # 1875 updates of 16 rows (the default) as 16 micro-batches of 1.
    c.train.steps = 1875
    c.train.grad_accum = 16
    # A checkpoint (three kept) and an evaluation every 250 steps.
    c.train.checkpoint_every = 250
    c.train.keep_checkpoints = 3
    c.train.eval_every = 250
    # Chunked LM loss: no [B, T, V] float32 logits for large vocabularies.
    c.train.loss_chunk = 128
    return c
