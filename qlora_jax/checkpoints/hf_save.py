"""``save_pretrained``: (model, params) -> a Hugging Face directory that transformers loads.

Float weights are written in PyTorch layout (``[out, in]`` Linear weights, one
tensor a layer); 4-bit weights are dequantized, or with ``keep_quantized``
written as bitsandbytes ``Linear4bit`` entries with a ``quantization_config``
in config.json. Tensors are produced and written one at a time; the
directory appears only when complete (written to a temporary sibling, then
renamed).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from qlora_jax.checkpoints.atomic import atomic_directory
from qlora_jax.checkpoints.safetensors_io import write_safetensors
from qlora_jax.lora.merge import merge
from qlora_jax.lora.params import is_adapter_path
from qlora_jax.lora.tree import flatten, unbox, unflatten
from qlora_jax.quant.blockwise import dequantize_xla
from qlora_jax.quant.bnb_format import BNB_QTYPES, to_bnb_state_dict
from qlora_jax.quant.qtensor import QTensor

Spec = tuple[str, np.dtype, tuple[int, ...], Any]
DEFAULT_SHARD_BYTES = 5 * 1024 ** 3


def layer_of(q: QTensor, i: int) -> QTensor:
    """Layer ``i`` of a QTensor stacked along its first axis."""
    return q.replace(**{k: a[i] for k, a in q.arrays().items()})


def _np_dtype(dtype: Any) -> np.dtype:
    return np.dtype(jnp.dtype(dtype))


def _tensor_specs(model: Any, params: dict, dtype: Any, keep_quantized: bool) -> list[Spec]:
    flat = flatten(params)
    specs: list[Spec] = []
    npd = _np_dtype(dtype)
    layers = model.config.num_hidden_layers
    for entry in model.hf_params():
        if entry.path not in flat:
            raise KeyError(f"params lack {'/'.join(entry.path)} (Hugging Face {entry.key})")
        value = flat[entry.path]
        for i in (range(layers) if entry.layered else [None]):
            key = entry.key.format(i=i) if entry.layered else entry.key
            if isinstance(value, QTensor):
                q = layer_of(value, i) if entry.layered else value
                if keep_quantized:
                    for k, a in to_bnb_state_dict(q, key).items():
                        specs.append((k, a.dtype, a.shape, (lambda a=a: a)))
                else:
                    specs.append((key, npd, q.logical_shape,
                                  (lambda q=q: np.asarray(dequantize_xla(q, dtype)))))
                continue
            arr = value[i] if entry.layered else value
            shape = tuple(reversed(arr.shape)) if entry.linear else tuple(arr.shape)

            def produce(arr=arr, linear=entry.linear):
                a = jnp.asarray(arr)
                return np.asarray((a.T if linear else a).astype(dtype))
            specs.append((key, npd, shape, produce))
    return specs


def _shards(specs: list[Spec], max_bytes: int) -> list[list[Spec]]:
    shards: list[list[Spec]] = [[]]
    size = 0
    for s in specs:
        n = int(np.prod(s[2], dtype=np.int64)) * np.dtype(s[1]).itemsize
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += n
    return shards


def _config_dict(model: Any, params_flat: dict, dtype: Any, keep_quantized: bool) -> dict:
    d = model.config.to_hf()
    d.pop("quantization_config", None)
    d.pop("torch_dtype", None)
    d["dtype"] = jnp.dtype(dtype).name
    d["architectures"] = [model.hf_architecture()]
    if getattr(model, "family", "") == "bert":
        if model.num_labels > 0:
            d["id2label"] = {str(i): f"LABEL_{i}" for i in range(model.num_labels)}
            d["label2id"] = {f"LABEL_{i}": i for i in range(model.num_labels)}
        else:
            d.pop("id2label", None)
            d.pop("label2id", None)
    qts = [(p, v) for p, v in params_flat.items() if isinstance(v, QTensor)]
    if keep_quantized and qts:
        q0 = qts[0][1]
        skip = _float_linear_names(model, params_flat)
        d["quantization_config"] = {
            "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": q0.qtype, "bnb_4bit_use_double_quant": q0.double_quant,
            "bnb_4bit_compute_dtype": jnp.dtype(dtype).name, "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": skip, "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False,
        }
    return d


def _float_linear_names(model: Any, flat: dict) -> list[str]:
    """Hugging Face names of linear modules kept in float (bitsandbytes must not convert them)."""
    names = []
    for site in model.module_sites():
        if site.kind not in ("linear", "head"):
            continue
        v = flat.get(site.path + ("kernel",))
        if v is not None and not isinstance(v, QTensor):
            names.extend(site.hf_names)
    if getattr(model.config, "tie_word_embeddings", False):
        names.append("lm_head")  # the tied head is the float embedding
    return names


def plain_model(model: Any, params: dict, merge_lora: bool) -> tuple[Any, dict]:
    """The model without adapters: merged into the base (``merge_lora``) or dropped; unboxed."""
    if model.lora is not None:
        if merge_lora:
            model, params = merge(model, params)
        else:
            params = unflatten({p: v for p, v in flatten(params).items()
                                if not is_adapter_path(p)})
            model = model.clone(lora=None)
    return model, unbox(params)


def save_pretrained(model: Any, params: dict, out_dir: str, merge_lora: bool = True,
                    keep_quantized: bool = False, dtype: Any = jnp.bfloat16,
                    max_shard_size: int = DEFAULT_SHARD_BYTES, format: str = "hf",
                    tokenizer: Any = None, gguf_type: str = "f16") -> str:
    """Writes config.json and model.safetensors (sharded above ``max_shard_size`` bytes).

    Args:
      model, params: a qlora_jax model and its params.
      out_dir: the directory to write (replaced as a whole when complete).
      merge_lora: fold adapters into the base weights first (``qj.lora.merge``:
        4-bit bases are dequantized, summed and requantized, as PEFT does);
        False writes the base weights without the adapters (save those with ``save_peft``).
      keep_quantized: write 4-bit weights as bitsandbytes entries (NF4/FP4 only)
        instead of dequantizing them.
      dtype: dtype of the float tensors written (and the compute dtype recorded
        in a quantization_config).
      max_shard_size: bytes a shard.
      format: ``"hf"`` (this directory) or ``"gguf"``: ``out_dir`` is then one new
        ``.gguf`` file for llama.cpp / ollama (Llama-family models; see
        ``checkpoints.gguf_save``), ``dtype`` and ``max_shard_size`` unused.
      tokenizer: ``format="gguf"`` only, required: the model's tokenizer
        (``qj.data.load_tokenizer(source)``) or the path of the source ``.gguf``.
      gguf_type: ``format="gguf"`` only: ``"f16"``, ``"q8_0"``, ``"bf16"`` or ``"f32"``.

    Returns:
      ``out_dir``.

    Raises:
      ValueError: ``keep_quantized`` with int4 weights (bitsandbytes has no int4); an
        unknown ``format``; for GGUF a non-Llama model, an unknown ``gguf_type``.
      FileExistsError: ``format="gguf"`` and the file exists.
    """
    if format not in ("hf", "gguf"):
        raise ValueError(f"format={format!r} is not one of 'hf' (a Hugging Face directory) "
                         "and 'gguf' (one llama.cpp file)")
    if format == "gguf":
        from qlora_jax.checkpoints.gguf_save import save_gguf
        return save_gguf(model, params, out_dir, merge_lora, tokenizer, gguf_type,
                         keep_quantized)
    model, params = plain_model(model, params, merge_lora)
    flat = flatten(params)
    if keep_quantized:
        bad = [("/".join(p), v.qtype) for p, v in flat.items()
               if isinstance(v, QTensor) and v.qtype not in BNB_QTYPES]
        if bad:
            raise ValueError(f"keep_quantized=True: bitsandbytes stores only {BNB_QTYPES}, but "
                             f"{bad[0][0]} is {bad[0][1]!r}; save with keep_quantized=False")
    specs = _tensor_specs(model, params, dtype, keep_quantized)
    config = _config_dict(model, flat, dtype, keep_quantized)
    shards = _shards(specs, max_shard_size)
    with atomic_directory(out_dir) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        if len(shards) == 1:
            write_safetensors(os.path.join(tmp, "model.safetensors"), shards[0],
                              metadata={"format": "pt"})
        else:
            weight_map, total = {}, 0
            for n, shard in enumerate(shards, 1):
                name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
                total += write_safetensors(os.path.join(tmp, name), shard,
                                           metadata={"format": "pt"})
                weight_map.update({s[0]: name for s in shard})
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f,
                          indent=2)
    return out_dir
