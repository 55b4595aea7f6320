"""Hugging Face checkpoints: safetensors I/O, from_pretrained / save_pretrained, PEFT adapters."""

from qlora_jax.checkpoints.hf_load import from_pretrained
from qlora_jax.checkpoints.hf_save import save_pretrained
from qlora_jax.checkpoints.peft import load_peft, save_peft
from qlora_jax.checkpoints.safetensors_io import (CheckpointReader, CorruptCheckpointError,
                                                  SafetensorsFile, write_safetensors)

__all__ = ["CheckpointReader", "CorruptCheckpointError", "SafetensorsFile", "from_pretrained",
           "load_peft",
           "save_peft", "save_pretrained", "write_safetensors"]
