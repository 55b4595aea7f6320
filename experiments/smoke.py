"""Smoke run: QLoRA on a tiny random Llama (built in code, no checkpoint), seconds on a CPU.

Launch (from the repository root):

    python -m qlora_jax.launch --config experiments/smoke.py --workdir /tmp/qj_smoke

Hardware: any CPU (2 cores are plenty). Expected result: 15-40 s in all, most of it
compilation; 40 steps of 8 rows; the response-only training loss falls from ~6.5 (about ln 512,
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

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config() -> ml_collections.ConfigDict:
    """The smoke experiment."""
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    # Hugging Face model directory; "" builds a random model from model.random.
    c.model.path = ""
    # Tokenizer directory or tokenizer.json ("" = model.path).
    c.model.tokenizer = os.path.join(HERE, "data", "smoke_tokenizer")
    # "causal_lm" (instruction data) or "classification" (text + label data, encoder with head).
    c.model.task = "causal_lm"
    # Compute dtype and dtype of the frozen float weights: float32, bfloat16 or float16.
    c.model.dtype = "float32"
    # Layer rematerialisation: none, full, dots_saveable, offload (saved activations on host),
    # qkv (also keeps each layer's q, k, v), attention (also the fused attention output), or
    # auto (the fastest whose compiled step fits the device memory or train.memory_budget_gib).
    c.model.remat = "none"
    # 4-bit matmul implementation: auto (Pallas on GPU/TPU, XLA on CPU), xla or pallas.
    c.model.impl = "auto"
    # Classification labels (0 = the dataset's label count); unused for causal LMs.
    c.model.num_labels = 0
    # Config.json fields of the random model (a 2-layer Llama over the 512-token smoke vocabulary).
    c.model.random = ml_collections.ConfigDict(dict(
        model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, tie_word_embeddings=False, rms_norm_eps=1e-6))

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
    # Adapter init: default (Kaiming A, zero B), gaussian or random.
    c.lora.init = "default"
    # Scale by alpha / sqrt(r) instead of alpha / r.
    c.lora.use_rslora = False
    # Modules trained in full (here the random model's LM head, so that logits can sharpen).
    c.lora.modules_to_save = ("lm_head",)
    # Adapter parameter dtype: float32 or bfloat16.
    c.lora.dtype = "float32"

    c.data = ml_collections.ConfigDict()
    # Training records (JSONL) or a builtin dataset name.
    c.data.path = os.path.join(HERE, "data", "smoke.train.jsonl")
    # Held-out records ("" = a builtin's validation split, or none).
    c.data.eval_path = os.path.join(HERE, "data", "smoke.eval.jsonl")
    # Record format: auto, alpaca, prompt_response, chat or classification.
    c.data.format = "auto"
    # Pack several examples a row (needs a model that honours segment_ids).
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
    c.optim.learning_rate = 1e-2
    # Schedule after warmup: constant, cosine or linear.
    c.optim.schedule = "cosine"
    # Warmup steps (> 0 wins over warmup_ratio).
    c.optim.warmup_steps = 4
    # Warmup as a fraction of train.steps (used when warmup_steps is 0).
    c.optim.warmup_ratio = 0.0
    # Final learning rate as a fraction of the peak (cosine, linear).
    c.optim.end_lr_ratio = 0.1
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

    c.train = ml_collections.ConfigDict()
    # Optimizer updates.
    c.train.steps = 40
    # Rows a step (global batch).
    c.train.batch_size = 8
    # Micro-batches a step (gradient accumulation); must divide batch_size.
    c.train.grad_accum = 1
    # Tokens a row (T).
    c.train.seq_len = 96
    # Device memory remat="auto" may plan for, GiB (0 = the device's limit less 10%).
    c.train.memory_budget_gib = 0.0
    # Log every this many steps.
    c.train.log_every = 5
    # Save a checkpoint every this many steps (0 = only at the end).
    c.train.checkpoint_every = 10
    # Checkpoints kept.
    c.train.keep_checkpoints = 2
    # Evaluate every this many steps (0 = never; else also before training and at the end).
    c.train.eval_every = 20
    # Eval batches a evaluation (0 = the whole eval set).
    c.train.eval_batches = 0
    # Rows an eval batch.
    c.train.eval_batch_size = 16
    # Seed of the data order, dropout and fresh weights.
    c.train.seed = 0
    # Chunked LM loss over this many positions at a time (0 = whole sequence).
    c.train.loss_chunk = 0
    # Fault injection for tests: the loss of this step becomes NaN (-1 = never).
    c.train.debug_nan_at_step = -1
    # Progress display: auto (bar on a terminal), bar or lines.
    c.train.progress = "auto"

    c.mesh = ml_collections.ConfigDict()
    # Data-parallel devices.
    c.mesh.data = 1
    # Fully-sharded (FSDP) devices.
    c.mesh.fsdp = 1
    # Tensor-parallel devices.
    c.mesh.tensor = 1
    return c
