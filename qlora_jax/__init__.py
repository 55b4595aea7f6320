"""qlora_jax: LoRA and QLoRA fine-tuning in JAX/Flax, file-compatible with PEFT and bitsandbytes."""

from qlora_jax import lora, quant
from qlora_jax import checkpoints, data, eval, models, sharding
from qlora_jax.checkpoints import from_pretrained, load_peft, save_peft, save_pretrained
from qlora_jax.generate import generate
from qlora_jax.lora.config import LoraConfig
from qlora_jax.quant.config import QuantConfig

__version__ = "0.1.0"

__all__ = ["LoraConfig", "QuantConfig", "lora", "quant", "__version__",
           "checkpoints", "models", "from_pretrained", "save_pretrained",
           "save_peft", "load_peft", "generate", "data", "sharding"]
