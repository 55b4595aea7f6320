"""LoRA: adapters beside frozen (float or 4-bit) weights in one params tree.

    cfg = qj.LoraConfig(r=16, alpha=32, target_modules="all-linear")
    mask = qj.lora.trainable_mask(params)          # True on lora_a / lora_b / modules_to_save
    trainable, frozen = qj.lora.partition(params)  # train `trainable` with any optax optimizer
    params = qj.lora.combine(trainable, frozen)
    model, merged = qj.lora.merge(model, params)   # fold adapters into the base weights
    stacked = qj.lora.stack_adapters([pa, pb])     # many adapters over one base (generate)

Params-tree helpers (flatten by path, counts, bytes) live in ``qlora_jax.lora.tree``.
"""

from qlora_jax.lora.config import LoraConfig, LoraSpec
from qlora_jax.lora.dense import LoraDense
from qlora_jax.lora.merge import dora_norms, merge, unmerge
from qlora_jax.lora.params import adapters, combine, partition, trainable_mask
from qlora_jax.lora.plan import LoraPlan, ModuleSite, resolve
from qlora_jax.lora.stack import stack_adapters
from qlora_jax.lora.trainable import Trainable

__all__ = [
    "LoraConfig", "LoraDense", "LoraPlan", "LoraSpec", "ModuleSite", "Trainable", "adapters",
    "combine", "dora_norms", "merge", "partition", "resolve", "stack_adapters", "trainable_mask",
    "unmerge",
]
