"""Memory accounting of fine-tuning: full fine-tuning, LoRA and QLoRA, bytes by kind.

    shape = LLAMA_8B
    for method in ("full", "lora", "qlora"):
        print(finetune_memory(shape, method, r=16))

The model counts what a training step must hold besides activations: weights (frozen or
trained), gradients, optimizer state and the adapters (with their gradients and optimizer
state). Every byte count comes from an explicit `Precision` (the assumptions), so the classic
figures of the LoRA/QLoRA papers are reproduced by naming their assumptions. `activation_memory`
gives a rough estimate of what a step keeps for the backward pass; it is the part the per-
parameter accounting leaves out and the reason measured peaks are higher.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

GB = 1e9
GIB = 2.0 ** 30
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A Llama-style decoder's sizes (D hidden, F MLP, L layers, H heads, V vocabulary)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``[out, in]`` of each linear weight of one layer, by Hugging Face name."""
        d, f, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        return {"q_proj": (d, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, d),
                "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}

    @property
    def linear_params(self) -> int:
        """Parameters of the layers' linear weights (what QLoRA quantizes)."""
        return self.layers * sum(o * i for o, i in self.linear_shapes().values())

    @property
    def embedding_params(self) -> int:
        """Input embedding plus output head (one matrix when tied)."""
        return self.vocab * self.hidden * (1 if self.tie_embeddings else 2)

    @property
    def norm_params(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    @property
    def num_params(self) -> int:
        return self.linear_params + self.embedding_params + self.norm_params

    def lora_params(self, r: int, targets: Sequence[str] = LINEAR_NAMES) -> int:
        """Adapter parameters ``r * (in + out)`` summed over the targeted linears of all layers."""
        shapes = self.linear_shapes()
        unknown = [t for t in targets if t not in shapes]
        if unknown:
            raise ValueError(f"unknown target modules {unknown}; use names of {tuple(shapes)}")
        if r < 1:
            raise ValueError(f"r={r} must be >= 1")
        return self.layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


# Llama 3 8B and 70B (config.json of meta-llama/Meta-Llama-3-*), the shapes of benchmarks/.
LLAMA_8B = ModelShape("llama-8b", 4096, 14336, 32, 32, 8, 128256)
LLAMA_70B = ModelShape("llama-70b", 8192, 28672, 80, 64, 8, 128256)
LLAMA_1B = ModelShape("llama-1b", 2048, 8192, 16, 32, 8, 128256, tie_embeddings=True)


@dataclasses.dataclass(frozen=True)
class Precision:
    """Bytes a parameter for each kind of state (the assumptions of an estimate).

    Attributes:
      weight: bytes a weight that stays in float (trained weights, a LoRA base, embeddings).
      grad: bytes a gradient of a trained weight (0: updated in the backward, never stored).
      optimizer: optimizer state a trained weight (AdamW: two moments; 8 in float32).
      master: float32 master copy of a trained weight kept by mixed precision (4) or not (0).
      adapter: bytes a LoRA parameter, its gradient and each of its two AdamW moments.
      qtype_bits: bits a 4-bit weight with its scales (NF4 + double quant, block 64: 4.127).
      quantize_embeddings: QLoRA quantizes the embedding and head too (bitsandbytes does not).
    """

    weight: float = 2.0
    grad: float = 2.0
    optimizer: float = 8.0
    master: float = 0.0
    adapter: float = 4.0
    qtype_bits: float = 4.0 + 8.0 / 64 + 32.0 / (64 * 256)
    quantize_embeddings: bool = False


@dataclasses.dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes a fine-tuning method holds, by kind (activations excluded)."""

    method: str
    num_params: int
    trainable_params: int
    weights: float
    gradients: float
    optimizer: float
    adapters: float  # adapter weights + gradients + optimizer state

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.adapters

    @property
    def bytes_per_param(self) -> float:
        """Total bytes over the base model's parameter count."""
        return self.total / self.num_params

    def as_dict(self, unit: float = GB) -> dict[str, float]:
        return {"method": self.method, "weights": self.weights / unit,
                "gradients": self.gradients / unit, "optimizer": self.optimizer / unit,
                "adapters": self.adapters / unit, "total": self.total / unit,
                "bytes_per_param": self.bytes_per_param}


METHODS = ("full", "lora", "qlora")


def finetune_memory(shape: ModelShape, method: str, r: int = 16,
                    targets: Sequence[str] = LINEAR_NAMES,
                    precision: Precision = Precision()) -> MemoryBreakdown:
    """Weights, gradients, optimizer state and adapters of one fine-tuning method.

    Args:
      shape: the model.
      method: ``"full"`` (every weight trained), ``"lora"`` (frozen float base + adapters) or
        ``"qlora"`` (frozen 4-bit linears, float embeddings/norms unless the precision says
        otherwise, + adapters).
      r: adapter rank R (LoRA, QLoRA).
      targets: adapted linear modules of each layer.
      precision: bytes of each kind of state.

    Returns:
      The breakdown in bytes.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {METHODS}")
    n, p = shape.num_params, precision
    if method == "full":
        return MemoryBreakdown(method, n, n, weights=n * (p.weight + p.master),
                               gradients=n * p.grad, optimizer=n * p.optimizer, adapters=0.0)
    n_lora = shape.lora_params(r, targets)
    adapters = n_lora * p.adapter * 4  # weight, gradient, two AdamW moments
    if method == "lora":
        weights = n * p.weight
    else:
        quantized = shape.linear_params + (shape.embedding_params if p.quantize_embeddings else 0)
        weights = quantized * p.qtype_bits / 8 + (n - quantized) * p.weight
    return MemoryBreakdown(method, n, n_lora, weights=weights, gradients=0.0, optimizer=0.0,
                           adapters=adapters)


def activation_memory(shape: ModelShape, batch: int, seq: int, remat: str = "full",
                      dtype_bytes: float = 2.0, loss_chunk: int = 512,
                      mlp_chunk: int = 0) -> dict[str, float]:
    """A rough estimate of the activations one training step holds at its peak (bytes).

    Counted: with full rematerialisation, each layer's input ``[B, T, D]`` (on the device, or
    in host memory with ``remat="full_offload"``); plus, for the one layer being recomputed in
    the backward, the inputs of its matmuls (``4 D + 3 F`` values a token: q/k/v and o inputs,
    attention output, gate, up and their product; with ``mlp_chunk`` > 0 the ``3 F`` part is
    held for one chunk of ``mlp_chunk`` tokens only, when rows are longer); without remat all
    layers keep those; plus the float32 logits of one loss chunk and their gradient
    (``2 * chunk * V * 4``). Not counted: XLA temporaries (on llama-8b at 32k-256k tokens the
    compiled step's temporaries were ~2.5x this estimate: gradients and float32 intermediates
    of the attention block), dequantized weight tiles, allocator slack, attention scores
    (fused attention keeps none).

    Returns:
      ``{"saved_layer_inputs", "layer_internals", "logits", "total"}`` in bytes of device
      memory, and ``"host_layer_inputs"`` (pinned host memory, ``full_offload``).
    """
    if remat not in ("full", "none", "full_offload"):
        raise ValueError(f"remat={remat!r}: this estimate knows 'full', 'full_offload' and "
                         "'none'")
    tokens = batch * seq
    d, f, layers = shape.hidden, shape.intermediate, shape.layers
    mlp_tokens = batch * min(mlp_chunk, seq) if mlp_chunk > 0 else tokens
    per_layer = (tokens * 4 * d + mlp_tokens * 3 * f) * dtype_bytes
    inputs = layers * tokens * d * dtype_bytes if remat != "none" else 0.0
    saved, host = (0.0, inputs) if remat == "full_offload" else (inputs, 0.0)
    internals = per_layer * (1 if remat != "none" else layers)
    chunk = min(loss_chunk or seq, seq) * batch
    logits = 2 * chunk * shape.vocab * 4.0
    return {"saved_layer_inputs": saved, "layer_internals": internals, "logits": logits,
            "total": saved + internals + logits, "host_layer_inputs": host}


def compiled_step_memory(config: Any) -> dict[str, float]:
    """Builds an experiment's train step and reads XLA's buffer assignment for it (bytes).

    The state and one batch are built exactly as the launcher builds them (``qlora_jax.train``);
    the step is lowered and compiled, not run. This is the measured counterpart of
    `finetune_memory` on any backend, the CPU included (where no device statistics exist).

    Args:
      config: an experiment config (``experiments/NAME.py``'s ``get_config()``).

    Returns:
      ``frozen``, ``trainable``, ``optimizer`` (bytes of the state's parts), ``arguments``,
      ``outputs``, ``aliased`` (outputs written over the donated state), ``temp`` (activations
      and other temporaries) and ``peak`` = arguments + outputs - aliased + temp.
    """
    import jax

    from qlora_jax import data as qdata
    from qlora_jax.lora import tree as lora_tree
    from qlora_jax.train import build
    from qlora_jax.train import config as train_config
    from qlora_jax.train.state import create_state
    from qlora_jax.train.step import make_train_step

    train_config.validate(config)
    build.check_paths(config)
    data = build.load_data(config)
    num_labels = config.model.num_labels
    if config.model.task == "classification" and not num_labels:
        num_labels = data.train.num_labels
    model, params = build.load_model(config, num_labels)
    tx, schedule = build.make_optimizer(config)
    state = create_state(params, tx, config.train.seed, build.DTYPES[config.lora.dtype])
    batch = next(qdata.TrainLoader(data.train, config.train.batch_size, config.train.seed))
    step = make_train_step(build.make_task(config, model), tx, schedule,
                           accum_steps=config.train.grad_accum,
                           dropout=config.lora.dropout > 0)
    analysis = step.lower(state, batch).compile().memory_analysis()
    out = {"frozen": float(lora_tree.nbytes(state.frozen)),
           "trainable": float(lora_tree.nbytes(state.trainable)),
           "optimizer": float(sum(x.nbytes for x in jax.tree.leaves(state.opt_state))),
           "arguments": float(analysis.argument_size_in_bytes),
           "outputs": float(analysis.output_size_in_bytes),
           "aliased": float(analysis.alias_size_in_bytes),
           "temp": float(analysis.temp_size_in_bytes)}
    out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temp"]
    return out
