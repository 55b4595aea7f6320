"""The default experiment config: every field, its one-line comment, and its default value.

An experiment (``experiments/NAME.py``) starts from `default_config` and sets only what differs::

    from qlora_jax.train.defaults import default_config

    def get_config():
        c = default_config()
        c.model.path = "/models/Llama-3.2-1B"
        c.lora.r = 64
        return c

The returned ``ConfigDict`` is locked: assigning a field that does not exist (a typo) raises
``AttributeError`` instead of adding a field nobody reads. An experiment that builds a random
model adds the optional ``model.random`` section (Hugging Face config.json fields) inside
``with c.unlocked():`` (see experiments/smoke.py). The allowed values of the choice fields are
`qlora_jax.train.config.CHOICES`, taken from the code that implements them.
"""

from __future__ import annotations

import ml_collections

#: Optional fields an experiment may add (inside ``c.unlocked()``); every other field is here.
OPTIONAL_FIELDS = ("model.random",)


def default_config() -> ml_collections.ConfigDict:
    """Every field of an experiment config with its default (a locked ``ConfigDict``)."""
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    # Hugging Face model directory; "" builds a random model from the optional model.random.
    c.model.path = ""
    # Tokenizer directory or tokenizer.json ("" = model.path).
    c.model.tokenizer = ""
    # "causal_lm" (instruction data) or "classification" (text + label data, encoder with head).
    c.model.task = "causal_lm"
    # Compute dtype and dtype of the frozen float weights: float32, bfloat16 or float16.
    c.model.dtype = "float32"
    # Layer rematerialisation: none, full, dots_saveable, offload (saved activations on host),
    # qkv (also keeps each layer's q, k, v), attention (also the fused attention output),
    # full_offload (full, with each layer's input in host memory: long rows), or auto (the
    # fastest whose compiled step fits the device memory or train.memory_budget_gib).
    c.model.remat = "none"
    # Rows longer than this many tokens run each MLP block in chunks of this many positions
    # (same numbers, no [T, intermediate] activation of the whole row; Llama family). 0: never.
    c.model.mlp_chunk = 8192
    # 4-bit matmul implementation: auto (Pallas on GPU/TPU, XLA on CPU), xla or pallas.
    c.model.impl = "auto"
    # Classification labels (0 = the dataset's label count); unused for causal LMs.
    c.model.num_labels = 0

    c.quant = ml_collections.ConfigDict()
    # Quantize the frozen linear weights to 4 bits (QLoRA).
    c.quant.enabled = True
    # 4-bit data type: nf4, fp4 or int4.
    c.quant.qtype = "nf4"
    # Elements a quantization block.
    c.quant.block_size = 64
    # Quantize the block scales too (8-bit, blocks of nested_block_size).
    c.quant.double_quant = True
    # Scales a nested block (double quantization).
    c.quant.nested_block_size = 256
    # Module names (suffix match) kept in full precision.
    c.quant.skip = ("lm_head",)

    c.lora = ml_collections.ConfigDict()
    # Adapter rank R.
    c.lora.r = 8
    # lora_alpha: the update is scaled by alpha / r.
    c.lora.alpha = 16.0
    # Dropout on the adapter input during training.
    c.lora.dropout = 0.05
    # Adapted modules: "all-linear", a regex, or a tuple of names.
    c.lora.target_modules = "all-linear"
    # Adapter init: default (Kaiming A, zero B), gaussian, random, or from the weights: pissa,
    # pissa_niter_K (randomized SVD, K iterations), olora (QR), loftq (4-bit bases).
    c.lora.init = "default"
    # Alternating quantize / low-rank-fit rounds of init="loftq".
    c.lora.loftq_iter = 1
    # Scale by alpha / sqrt(r) instead of alpha / r.
    c.lora.use_rslora = False
    # DoRA: a trained magnitude per output feature times the normalised W + s B A.
    c.lora.use_dora = False
    # Modules trained in full (none: adapters only).
    c.lora.modules_to_save = ()
    # Adapter parameter dtype: float32 or bfloat16.
    c.lora.dtype = "float32"

    c.data = ml_collections.ConfigDict()
    # Training records (JSONL) or a builtin dataset name.
    c.data.path = ""
    # Held-out records ("" = a builtin's validation split, or none).
    c.data.eval_path = ""
    # Record format: auto, alpaca, prompt_response, chat or classification.
    c.data.format = "auto"
    # Pack several examples a row (best-fit decreasing; attention stays within each example).
    c.data.packing = False
    # Examples longer than train.seq_len: "truncate" (cut; counted in the log) or "error".
    c.data.overlong = "truncate"
    # Shorter row lengths to pad batches to (each compiles once); () = seq_len only.
    c.data.length_buckets = ()
    # Label names for string labels (classification); () = builtin or derived.
    c.data.labels = ()

    c.optim = ml_collections.ConfigDict()
    # Optimizer: adamw or sgd.
    c.optim.name = "adamw"
    # Peak learning rate.
    c.optim.learning_rate = 2e-4
    # Schedule after warmup: constant, cosine or linear.
    c.optim.schedule = "constant"
    # Warmup steps (> 0 wins over warmup_ratio).
    c.optim.warmup_steps = 0
    # Warmup as a fraction of train.steps (used when warmup_steps is 0).
    c.optim.warmup_ratio = 0.0
    # Final learning rate as a fraction of the peak (cosine, linear).
    c.optim.end_lr_ratio = 0.0
    # Adam beta1 (SGD momentum).
    c.optim.b1 = 0.9
    # Adam beta2.
    c.optim.b2 = 0.999
    # Adam epsilon.
    c.optim.eps = 1e-8
    # Decoupled weight decay.
    c.optim.weight_decay = 0.0
    # Global gradient-norm clipping (0 = off).
    c.optim.max_grad_norm = 1.0
    # Keep the optimizer state in pinned host memory between steps.
    c.optim.offload_state = False
    # LoRA+: lora_b's learning rate is this times the others' (1 = plain LoRA).
    c.optim.loraplus_lr_ratio = 1.0

    c.train = ml_collections.ConfigDict()
    # Optimizer updates.
    c.train.steps = 100
    # Rows a step (global batch).
    c.train.batch_size = 16
    # Micro-batches a step (gradient accumulation); must divide batch_size.
    c.train.grad_accum = 1
    # Tokens a row (T).
    c.train.seq_len = 512
    # Device memory remat="auto" may plan for, GiB (0 = the device's limit less 10%).
    c.train.memory_budget_gib = 0.0
    # Log every this many steps.
    c.train.log_every = 10
    # Save a checkpoint every this many steps (0 = only at the end).
    c.train.checkpoint_every = 0
    # Also save when this many minutes of wall time passed since the last save (0 = off).
    c.train.checkpoint_every_minutes = 0.0
    # Checkpoints kept.
    c.train.keep_checkpoints = 2
    # Evaluate every this many steps (0 = never; else also before training and at the end).
    c.train.eval_every = 0
    # Eval batches an evaluation (0 = the whole eval set).
    c.train.eval_batches = 0
    # Rows an eval batch.
    c.train.eval_batch_size = 16
    # Seed of the data order, dropout and fresh weights.
    c.train.seed = 0
    # Chunked LM loss over this many positions at a time (0 = whole sequence): no [B, T, V]
    # float32 logits for large vocabularies.
    c.train.loss_chunk = 0
    # Progress display: auto (bar on a terminal), bar or lines.
    c.train.progress = "auto"
    # Held-out prompts of a causal LM answered greedily before and after training (printed).
    c.train.samples = 0
    # Tokens generated for each of them.
    c.train.sample_tokens = 48

    c.mesh = ml_collections.ConfigDict()
    # Data-parallel devices.
    c.mesh.data = 1
    # Fully-sharded (FSDP) devices.
    c.mesh.fsdp = 1
    # Tensor-parallel devices.
    c.mesh.tensor = 1
    # Logical-axis rules, a tuple of (logical axis, mesh axis or axes); () = the built-in rules.
    c.mesh.rules = ()

    c.lock()
    return c
