"""LoRA: adapters beside frozen (float or 4-bit) weights in one params tree.

    cfg = qj.LoraConfig(r=16, alpha=32, target_modules="all-linear")
    mask = qj.lora.trainable_mask(params)         # True on lora_a / lora_b / modules_to_save
    tx = qj.lora.masked(optax.adamw(2e-4))        # optimizer state for trainable leaves only
    model, merged = qj.lora.merge(model, params)  # fold adapters into the base weights
    stacked = qj.lora.stack_adapters([pa, pb])    # many adapters over one base (generate)
"""

from qlora_jax.lora.config import LoraConfig, LoraSpec
from qlora_jax.lora.dense import LoraDense
from qlora_jax.lora.merge import dora_norms, merge, unmerge
from qlora_jax.lora.optim import apply_updates, masked, state_nbytes
from qlora_jax.lora.params import (adapters, combine, count, flatten, is_leaf, nbytes, partition,
                                   trainable_mask, unbox, unflatten)
from qlora_jax.lora.plan import LoraPlan, ModuleSite, resolve
from qlora_jax.lora.stack import stack_adapters
from qlora_jax.lora.trainable import Trainable

__all__ = [
    "LoraConfig", "LoraDense", "LoraPlan", "LoraSpec", "ModuleSite", "Trainable", "adapters",
    "apply_updates", "combine", "count", "dora_norms", "flatten", "is_leaf", "masked", "merge",
    "nbytes", "partition", "resolve", "stack_adapters", "state_nbytes", "trainable_mask", "unbox",
    "unflatten", "unmerge",
]
