"""``from_pretrained``: a Hugging Face model directory -> (model, params), quantizing while reading.

Order of work (every user error is raised before any weight is read):

1. the directory and config.json exist; the model_type is supported;
2. the LoraConfig resolves against the model's modules (unmatched targets named);
3. every safetensors header parses and every tensor lies inside its file;
4. every tensor the model needs is present with the shape config.json implies;
5. tensors are read one at a time: linear weights ``[out, in]`` are cast to
   ``dtype`` and quantized (a QTensor ``[out, in]``) or transposed to Flax's
   ``[in, out]``; a bitsandbytes 4-bit checkpoint's weights become QTensors
   as stored. Per-layer tensors are written into one preallocated stacked
   buffer (leading axis L, for ``nn.scan``) so the host holds the finished
   (quantized) parameters plus one entry under construction.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
import zlib
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.checkpoints.safetensors_io import CheckpointReader
from qlora_jax.formats.gguf import GGUFTensors, is_gguf
from qlora_jax.lora import dora
from qlora_jax.lora.config import LoraConfig, data_aware
from qlora_jax.lora.dense import lora_a_init, lora_b_init
from qlora_jax.lora.init import init_kernel
from qlora_jax.lora.tree import flatten, unflatten
from qlora_jax.lora.trainable import Trainable
from qlora_jax.models.common import HFParam
from qlora_jax.models.registry import build_model
from qlora_jax.quant.blockwise import quantize
from qlora_jax.quant.bnb_format import from_bnb_state_dict, is_bnb_weight
from qlora_jax.quant.config import QuantConfig
from qlora_jax.quant.qtensor import QTensor

_IGNORED_SUFFIXES = ("position_ids", "rotary_emb.inv_freq", "masked_bias", "attn.bias")


def read_config(path: str) -> dict[str, Any]:
    """config.json of a model directory (clear errors for a missing dir or file)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory not found: {path!r} (expected a directory "
                                "with config.json and *.safetensors)")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path!r} has no config.json; a Hugging Face model directory "
                                "holds config.json and *.safetensors")
    try:
        with open(cfg_path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from e


def end_token_ids(path: str, hf_config: dict[str, Any]) -> tuple[int, ...]:
    """Every end id the checkpoint names: config.json's ``eos_token_id`` (an id or a list), then
    generation_config.json's (Llama-3 instruct models list ``<|eot_id|>`` there), in order."""
    out: list[int] = []
    gen_path = os.path.join(path, "generation_config.json")
    gen = {}
    if os.path.isfile(gen_path):
        try:
            with open(gen_path, encoding="utf-8") as f:
                gen = json.load(f)
        except (OSError, json.JSONDecodeError):
            warnings.warn(f"{gen_path} is not valid JSON; its end ids are ignored", stacklevel=3)
    for value in (hf_config.get("eos_token_id"), gen.get("eos_token_id") if isinstance(
            gen, dict) else None):
        for i in value if isinstance(value, list) else [value]:
            if isinstance(i, int) and not isinstance(i, bool) and i not in out:
                out.append(i)
    return tuple(out)


def bnb_quant_config(hf_config: dict[str, Any]) -> Optional[QuantConfig]:
    """The QuantConfig of a bitsandbytes 4-bit checkpoint (None for a float checkpoint)."""
    qc = hf_config.get("quantization_config")
    if not qc:
        return None
    if qc.get("quant_method") != "bitsandbytes" or not (qc.get("load_in_4bit") or
                                                         qc.get("_load_in_4bit")):
        raise ValueError(f"quantization_config {qc.get('quant_method')!r} "
                         f"(load_in_8bit={qc.get('load_in_8bit')}) is not supported; qlora_jax "
                         "reads bitsandbytes 4-bit checkpoints and float checkpoints")
    skip = tuple(qc.get("llm_int8_skip_modules") or ("lm_head",))
    return QuantConfig(qtype=qc.get("bnb_4bit_quant_type", "nf4"),
                       double_quant=bool(qc.get("bnb_4bit_use_double_quant", False)), skip=skip)


def _np_dtype(dtype: Any) -> np.dtype:
    return np.dtype(jnp.dtype(dtype))


def expected_shapes(model: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Float parameter shapes of the base model (no LoRA, no quantization), by Flax path."""
    base = model.clone(lora=None, quant=None)
    shapes = jax.eval_shape(lambda: base.init(jax.random.PRNGKey(0), *base.dummy_inputs()))
    return {p: tuple(v.shape) for p, v in flatten(shapes["params"]).items()}


class _Plan:
    """Which checkpoint key feeds each (entry, layer), checked against the expected shapes."""

    def __init__(self, model: Any, reader: CheckpointReader, shapes: dict, bnb: bool):
        self.items: list[tuple[HFParam, Optional[list[str]]]] = []
        layers = model.config.num_hidden_layers
        consumed: set[str] = set()
        for entry in model.hf_params():
            if entry.path not in shapes:
                raise AssertionError(f"internal: {entry.path} is not a parameter of the model")
            full = shapes[entry.path]
            per_layer = full[1:] if entry.layered else full
            want = tuple(reversed(per_layer)) if entry.linear else per_layer
            keys: list[str] = []
            for i in (range(layers) if entry.layered else [None]):
                key = next((k for k in entry.keys_for(i) if k in reader), None)
                if key is None:
                    key = next((k for k in entry.keys_for(i) if is_bnb_weight(reader, k)), None)
                if key is None:
                    if entry.optional:
                        keys = None
                        break
                    raise KeyError(f"{reader.directory}: the checkpoint lacks tensor "
                                   f"{entry.keys_for(i)[0]!r}, which config.json "
                                   f"({model.config.model_type}) implies")
                got = self._shape(reader, key, bnb)
                if got != want:
                    raise ValueError(f"{reader.file_of(key)}: tensor {key!r} has shape "
                                     f"{list(got)}, but config.json implies {list(want)}")
                keys.append(key)
                consumed.add(key)
            self.items.append((entry, keys))
        extra = [k for k in reader if k not in consumed and not k.endswith(_IGNORED_SUFFIXES)
                 and not any(k.startswith(c + ".") for c in consumed)]
        if extra:
            warnings.warn(f"{reader.directory}: {len(extra)} checkpoint tensor(s) are not used "
                          f"by {type(model).__name__}, e.g. {extra[:4]}", stacklevel=3)

    @staticmethod
    def _shape(reader: CheckpointReader, key: str, bnb: bool) -> tuple[int, ...]:
        if bnb and is_bnb_weight(reader, key):
            qs = next(k for k in reader if k.startswith(key + ".quant_state."))
            meta = json.loads(bytes(reader[qs].tobytes()).decode("utf-8"))
            return tuple(int(d) for d in meta["shape"])
        return tuple(reader.shape(key))


def _convert(reader: CheckpointReader, key: str, entry: HFParam, dtype: Any,
             quant: Optional[QuantConfig]) -> Any:
    """One tensor as it goes into the params tree: numpy (float) or a QTensor (numpy fields)."""
    if is_bnb_weight(reader, key):
        q = from_bnb_state_dict(reader, key)
        return q.replace(**{k: np.asarray(v) for k, v in q.arrays().items()})
    w = reader[key]
    if entry.linear and quant is not None:
        # transformers casts to the load dtype (round to nearest even), then quantizes.
        x = w.astype(_np_dtype(dtype), copy=False)
        del w
        q = quantize(x, quant.qtype, quant.block_size, quant.double_quant,
                     quant.nested_block_size)
        del x
        return q.replace(**{k: np.asarray(v) for k, v in q.arrays().items()})
    if not np.issubdtype(w.dtype, np.floating) and w.dtype.name != "bfloat16":
        raise ValueError(f"{reader.file_of(key)}: tensor {key!r} has dtype {w.dtype}, "
                         "expected a float dtype")
    w = w.T if entry.linear else w
    return w.astype(_np_dtype(dtype))


def _load_entry(reader, entry, keys, dtype, quant) -> Any:
    if not entry.layered:
        v = _convert(reader, keys[0], entry, dtype, quant)
        return _to_device(v)
    stacked: Any = None
    for i, key in enumerate(keys):
        v = _convert(reader, key, entry, dtype, quant)
        if stacked is None:
            if isinstance(v, QTensor):
                stacked = v.replace(**{k: np.empty((len(keys),) + a.shape, a.dtype)
                                       for k, a in v.arrays().items()})
            else:
                stacked = np.empty((len(keys),) + v.shape, v.dtype)
        if isinstance(v, QTensor):
            if (v.logical_shape, v.qtype, v.block_size, v.nested_block_size) != (
                    stacked.logical_shape, stacked.qtype, stacked.block_size,
                    stacked.nested_block_size):
                raise ValueError(f"{key}: 4-bit settings differ from layer 0 ({v} vs {stacked}); "
                                 "stacked layers need the same quantization")
            for name, a in v.arrays().items():
                getattr(stacked, name)[i] = a
        else:
            stacked[i] = v
        del v
    return _to_device(stacked)


def _to_device(v: Any) -> Any:
    if isinstance(v, QTensor):
        return v.replace(**{k: jnp.asarray(a) for k, a in v.arrays().items()})
    return jnp.asarray(v)


def _fresh(path: tuple[str, ...], shape: tuple[int, ...], dtype: Any, key: jax.Array) -> jax.Array:
    if path[-1] in ("kernel", "embedding"):
        return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    if path[-1] == "scale":
        return jnp.ones(shape, dtype)
    return jnp.zeros(shape, dtype)


def _path_key(key: jax.Array, path: tuple[str, ...]) -> jax.Array:
    return jax.random.fold_in(key, zlib.crc32("/".join(path).encode()) & 0x7FFFFFFF)


def add_magnitudes(plan: Any, flat: dict) -> None:
    """DoRA: ``lora_magnitude = ||W + s B A||_row`` for every DoRA module that lacks one."""
    for path, spec in plan.specs:
        if spec.use_dora and path + (dora.MAGNITUDE,) not in flat:
            flat[path + (dora.MAGNITUDE,)] = dora.weight_norm(
                getattr(flat[path + ("kernel",)], "value", flat[path + ("kernel",)]),
                flat[path + ("lora_a",)], flat[path + ("lora_b",)], spec.scaling)


def add_adapters(model: Any, params: dict, seed: int = 0) -> dict:
    """Adds freshly initialised adapters for ``model.lora_plan()`` and boxes modules_to_save.

    Adapters are built directly from the kernels' shapes (nothing else is
    initialised): ``lora_a`` ``[..., in, R]`` and ``lora_b`` ``[..., R, out]``
    with the initialisers LoraDense uses, one key per layer.
    """
    plan = model.lora_plan()
    if plan is None:
        return params
    flat = flatten(params)
    root = jax.random.PRNGKey(seed)
    for path, spec in plan.specs:
        kernel = flat.get(path + ("kernel",))
        if kernel is None:
            raise KeyError(f"params lack {'/'.join(path)}/kernel, which the LoraConfig targets")
        if path + ("lora_a",) in flat:  # a data-aware init made it while loading
            continue
        kernel = getattr(kernel, "value", kernel)
        if isinstance(kernel, QTensor):
            out_f, in_f = kernel.logical_shape
        else:
            in_f, out_f = kernel.shape[-2:]
        stack = tuple(kernel.shape[:-2])
        n = int(np.prod(stack)) if stack else 1
        ka, kb = jax.random.split(_path_key(root, path))
        a = jax.vmap(lambda k: lora_a_init(spec)(k, (in_f, spec.r), jnp.float32))(
            jax.random.split(ka, n))
        b = jax.vmap(lambda k: lora_b_init(spec)(k, (spec.r, out_f), jnp.float32))(
            jax.random.split(kb, n))
        flat[path + ("lora_a",)] = a.reshape(stack + a.shape[1:])
        flat[path + ("lora_b",)] = b.reshape(stack + b.shape[1:])
    add_magnitudes(plan, flat)
    for p, v in list(flat.items()):
        if plan.saves(p[:-1]) and not isinstance(v, Trainable):
            if isinstance(v, QTensor):
                raise ValueError(f"modules_to_save covers {'/'.join(p)}, a 4-bit weight; add the "
                                 "module to QuantConfig.skip to train it in full")
            flat[p] = Trainable(v)
    return unflatten(flat)


def from_pretrained(path: str, dtype: Any = jnp.bfloat16, quant: Optional[QuantConfig] = None,
                    lora: Optional[LoraConfig] = None, *, impl: str = "auto", remat: str = "none",
                    num_labels: int = 0, seed: int = 0, **model_attrs: Any) -> tuple[Any, dict]:
    """Reads a Hugging Face model directory into a qlora_jax model and its params.

    Args:
      path: a directory with config.json and model.safetensors (or shards with
        model.safetensors.index.json), written by transformers (float or
        bitsandbytes 4-bit); or a llama.cpp ``.gguf`` file (or a directory
        holding one and no config.json): config from its metadata, tensors
        dequantized from any type the ``gguf`` package decodes, one at a time.
      dtype: compute dtype and dtype of the float parameters.
      quant: quantize linear weights while reading (ignored for a bitsandbytes
        checkpoint, whose 4-bit weights are kept as stored).
      lora: add freshly initialised adapters (and box modules_to_save leaves). Data-aware
        inits (``"pissa"``, ``"pissa_niter_K"``, ``"olora"``, ``"loftq"``) read each
        adapted weight in float (one stacked entry at a time), decompose it and quantize
        the new base (the residual ``W - s B A``; LoftQ's own 4-bit base) with ``quant``;
        on a bitsandbytes checkpoint PiSSA/OLoRA dequantize, decompose and requantize the
        residual, and LoftQ (which needs the float weights) raises.
      impl: 4-bit matmul implementation; remat: remat mode of the layers.
      num_labels: encoders only: > 0 adds a classification head (read from the
        checkpoint when present, else freshly initialised).
      seed: seed of the fresh adapters (and fresh head).
      **model_attrs: further model attributes (e.g. ``float32_logits=True``).

    Returns:
      ``(model, params)``; ``model.apply({"params": params}, input_ids, attention_mask)``.

    Raises:
      FileNotFoundError: a missing directory, config.json or safetensors file.
      ValueError: unsupported model_type, corrupt/truncated safetensors (file
        named), tensor shapes that disagree with config.json (tensor and both
        shapes named), target_modules matching nothing.
      KeyError: a tensor the config implies is missing.
    """
    gguf = GGUFTensors(path) if is_gguf(path) else None
    hf_config = gguf.hf_config if gguf is not None else read_config(path)
    bnb = bnb_quant_config(hf_config)
    model = build_model(hf_config, dtype=dtype, param_dtype=dtype, impl=impl, remat=remat,
                        num_labels=num_labels, **model_attrs)
    model = model.clone(quant=bnb if bnb is not None else quant, lora=lora)
    ends = end_token_ids(path, hf_config)
    if len(ends) > 1 and hasattr(model.config, "eos_token_id"):  # generate stops at each
        model = model.clone(config=dataclasses.replace(model.config, eos_token_id=ends))
    model.lora_plan()  # unmatched targets fail here, before reading anything
    quant_paths = set(model.quantized_paths()) if (quant is not None and bnb is None) else set()
    reader = gguf if gguf is not None else CheckpointReader(path)
    shapes = expected_shapes(model)
    plan = _Plan(model, reader, shapes, bnb is not None)
    flat: dict[tuple[str, ...], Any] = {}
    root = jax.random.PRNGKey(seed)
    lora_plan = model.lora_plan()
    decompose = {p: s for p, s in (lora_plan.specs if lora_plan else ()) if data_aware(s.init)}
    for entry, keys in plan.items:
        if keys is None:
            flat[entry.path] = _fresh(entry.path, shapes[entry.path], dtype,
                                      _path_key(root, entry.path))
            continue
        q = quant if entry.linear and entry.module_path in quant_paths else None
        spec = decompose.get(entry.module_path) if entry.path[-1] == "kernel" else None
        if spec is None:
            flat[entry.path] = _load_entry(reader, entry, keys, dtype, q)
            continue
        # Data-aware init: the float weight (or a bnb QTensor), decomposed, then quantized.
        kernel, a, b = init_kernel(spec, _load_entry(reader, entry, keys, dtype, None),
                                   _path_key(root, entry.module_path), q, lora.loftq_iter,
                                   ".".join(entry.module_path))
        flat[entry.path] = kernel
        flat[entry.module_path + ("lora_a",)] = a
        flat[entry.module_path + ("lora_b",)] = b
    params = add_adapters(model, unflatten(flat), seed)
    return model, params
