"""Hugging Face checkpoints: safetensors I/O, from_pretrained / save_pretrained, PEFT adapters.

    model, params = qj.from_pretrained("llama-dir", dtype=jnp.bfloat16,
                                       quant=qj.QuantConfig(),            # NF4 while reading
                                       lora=qj.LoraConfig(r=16, alpha=32, target_modules="all-linear"))
    logits = model.apply({"params": params}, input_ids, attention_mask)   # [B, T, V]
    qj.save_peft(model, params, "adapter/")                 # peft.PeftModel.from_pretrained reads it
    model, params = qj.load_peft(model, params, "adapter/")  # reads what PEFT writes
    qj.save_pretrained(model, params, "merged/")             # transformers reads it (merged, bf16)
    qj.save_pretrained(model, params, "q4/", keep_quantized=True)  # bitsandbytes 4-bit

A directory that transformers saved from a bitsandbytes 4-bit model loads as
QTensors without re-quantizing. Encoders (BERT, RoBERTa, MiniLM) take
``num_labels`` for a classification head.
"""

from qlora_jax.checkpoints.hf_load import from_pretrained
from qlora_jax.checkpoints.hf_save import save_pretrained
from qlora_jax.checkpoints.peft import load_peft, save_peft
from qlora_jax.checkpoints.safetensors_io import (CheckpointReader, CorruptCheckpointError,
                                                  SafetensorsFile, write_safetensors)

__all__ = ["CheckpointReader", "CorruptCheckpointError", "SafetensorsFile", "from_pretrained",
           "load_peft",
           "save_peft", "save_pretrained", "write_safetensors"]
