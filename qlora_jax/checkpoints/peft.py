"""PEFT LoRA adapters: ``save_peft`` writes and ``load_peft`` reads what ``peft`` writes and reads.

Files: ``adapter_model.safetensors`` (metadata ``{"format": "pt"}``) with keys
``base_model.model.<module>.lora_A.weight`` ``[R, in]`` and ``...lora_B.weight``
``[out, R]``, one pair a layer (our stacked ``lora_a`` ``[L, in, R]`` and
``lora_b`` ``[L, R, out]`` are split and transposed), DoRA's ``lora_magnitude`` ``[L, out]`` as
``...lora_magnitude_vector`` ``[out]`` a layer, ``modules_to_save``
weights saved whole under ``base_model.model.<module>.weight``; and
``adapter_config.json``.

Data-aware inits (``qj.lora.init``): PiSSA and OLoRA train on a residual base ``W - s B0 A0``.
Given the adapters at initialisation, ``save_peft`` writes what PEFT's
``save_pretrained(path_initial_model_for_weight_conversion=...)`` writes: a plain LoRA for the
ORIGINAL base, of rank 2R, ``A' = [A; A0]``, ``B' = [B, -B0]`` (so ``s' B' A' = s (B A - B0 A0)``
with ``r' = 2r``, ``alpha' = 2 alpha``, or ``alpha sqrt(2)`` with rsLoRA).
Without them, PiSSA (full SVD) and OLoRA adapters are written with PEFT's
``init_lora_weights="pissa"``/``"olora"``: PEFT recomputes the same residual from the original
base when it loads them. LoftQ adapters go with their quantized base, as PEFT's LoftQ docs
prescribe: save the base with ``qj.save_pretrained(model, params, dir, merge_lora=False)``
(LoftQ's dequantized weights, or ``keep_quantized=True`` for bitsandbytes 4-bit) and load the
adapter on that base.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

from qlora_jax import module_names
from qlora_jax.checkpoints.atomic import atomic_directory
from qlora_jax.checkpoints.safetensors_io import SafetensorsFile, write_safetensors
from qlora_jax.lora import init as lora_init
from qlora_jax.lora.dora import MAGNITUDE
from qlora_jax.lora.config import LoraConfig
from qlora_jax.lora.params import is_adapter_path
from qlora_jax.lora.tree import flatten, unbox, unflatten
from qlora_jax.lora.trainable import Trainable
from qlora_jax.quant.qtensor import QTensor

PREFIX = "base_model.model."
PEFT_MAGNITUDE = "lora_magnitude_vector"  # DoRA's magnitude, [out] a layer
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def _sites_by_path(model: Any) -> dict[tuple[str, ...], Any]:
    return {s.path: s for s in model.module_sites()}


def _kernel_in_out(kernel: Any) -> tuple[int, int]:
    kernel = getattr(kernel, "value", kernel)
    if isinstance(kernel, QTensor):
        out_f, in_f = kernel.logical_shape
        return in_f, out_f
    return int(kernel.shape[-2]), int(kernel.shape[-1])


def _saved_entries(model: Any, plan: Any) -> list[Any]:
    return [e for e in model.hf_params() if plan.saves(e.module_path)]


def _peft_config(model: Any, lora: LoraConfig, plan: Any, base: str) -> dict[str, Any]:
    tm: Any = lora.target_modules
    if tm is None:
        tm = list(model.default_lora_targets)
    elif tm == "all-linear" or not isinstance(tm, str):
        if tm == "all-linear":
            sites = _sites_by_path(model)
            tm = sorted({n for p in plan.adapted_paths for n in sites[p].hf_names})
        else:
            tm = list(tm)
    # LoftQ: True, as PEFT's LoftQ recipe sets before saving (the adapter goes with the base
    # saved with LoftQ's weights); PiSSA/OLoRA keep their name (PEFT re-decomposes on load).
    init = {"default": True, "gaussian": "gaussian", "random": False,
            "loftq": True}.get(lora.init, lora.init)
    return {
        "peft_type": "LORA", "task_type": model.task, "r": lora.r, "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout, "target_modules": tm, "bias": "none",
        "use_rslora": lora.use_rslora, "use_dora": bool(lora.use_dora), "fan_in_fan_out": False,
        "modules_to_save": list(lora.modules_to_save) or None,
        "rank_pattern": dict(lora.rank_pattern), "alpha_pattern": dict(lora.alpha_pattern),
        "init_lora_weights": init, "base_model_name_or_path": base or None,
        "inference_mode": True, "layers_to_transform": None, "layers_pattern": None,
        "revision": None, "exclude_modules": None,
    }


def _converted_config(config: dict[str, Any]) -> dict[str, Any]:
    """PEFT's config of a PiSSA/OLoRA adapter converted to a rank-2R LoRA on the original base."""
    config = dict(config, init_lora_weights=True, r=2 * config["r"])
    config["lora_alpha"] = config["lora_alpha"] * (2 ** 0.5 if config["use_rslora"] else 2)
    config["rank_pattern"] = {k: 2 * v for k, v in config["rank_pattern"].items()}
    config["alpha_pattern"] = {k: 2 * v for k, v in config["alpha_pattern"].items()}
    return config


def save_peft(model: Any, params: dict, out_dir: str, base_model_name_or_path: str = "",
              initial_adapters: Optional[dict] = None) -> str:
    """Writes the model's adapters (and modules_to_save weights) as a PEFT LoRA adapter.

    ``peft.PeftModel.from_pretrained(transformers_model, out_dir)`` loads it.

    Args:
      initial_adapters: for ``init="pissa"``/``"pissa_niter_K"``/``"olora"``: the adapters
        at initialisation (``qj.lora.adapters(params)`` right after ``from_pretrained``);
        the file then holds PEFT's conversion to a plain rank-2R LoRA on the original base.

    Raises:
      ValueError: the model has no LoRA config; a ``pissa_niter_K`` adapter without
        ``initial_adapters`` (PEFT's randomized SVD would not rebuild its residual base);
        initial adapters with rsLoRA and rank/alpha patterns (PEFT refuses that conversion).
    """
    plan = model.lora_plan()
    if plan is None:
        raise ValueError("save_peft: the model has no LoRA adapters (model.lora is None)")
    init = plan.config.init
    convert = initial_adapters is not None and init.startswith(("pissa", "olora"))
    if init.startswith("pissa_niter_") and not convert:
        raise ValueError(f"save_peft: init={init!r} adapters need initial_adapters="
                         "qj.lora.adapters(params at initialisation) to be converted to a LoRA "
                         "on the original base (PEFT's randomized SVD would not rebuild the "
                         "residual base)")
    if convert and plan.config.use_rslora and (plan.config.rank_pattern
                                               or plan.config.alpha_pattern):
        raise ValueError("save_peft: converting a PiSSA/OLoRA adapter with use_rslora and "
                         "rank_pattern/alpha_pattern is not supported (PEFT refuses it too)")
    flat = flatten(unbox(params))
    flat0 = flatten(initial_adapters) if convert else {}
    sites = _sites_by_path(model)
    specs = []

    def add(key: str, array: Any) -> None:
        a = np.asarray(array)
        specs.append((PREFIX + key, a.dtype, a.shape, lambda a=a: a))

    for path, spec in plan.specs:
        a, b = flat.get(path + ("lora_a",)), flat.get(path + ("lora_b",))
        if a is None or b is None:
            raise KeyError(f"params lack the adapter of {'/'.join(path)} that the model declares")
        if convert:
            a0, b0 = flat0.get(path + ("lora_a",)), flat0.get(path + ("lora_b",))
            if a0 is None or b0 is None:
                raise KeyError(f"initial_adapters lack the adapter of {'/'.join(path)}")
            # [A; A0] (rank axis last in our layout) and [B, -B0].
            a = jnp.concatenate([jnp.asarray(a), jnp.asarray(a0).astype(a.dtype)], axis=-1)
            b = jnp.concatenate([jnp.asarray(b), -jnp.asarray(b0).astype(b.dtype)], axis=-2)
        names = sites[path].hf_names
        stacked = a.ndim == 3
        m = flat.get(path + (MAGNITUDE,))
        if spec.use_dora and m is None:
            raise KeyError(f"params lack the DoRA magnitude of {'/'.join(path)}")
        for i, name in enumerate(names):
            ai, bi = (a[i], b[i]) if stacked else (a, b)
            add(f"{name}.lora_A.weight", jnp.asarray(ai).T)
            add(f"{name}.lora_B.weight", jnp.asarray(bi).T)
            if spec.use_dora:
                add(f"{name}.{PEFT_MAGNITUDE}", m[i] if stacked else m)
    for entry in _saved_entries(model, plan):
        v = flat[entry.path]
        if isinstance(v, QTensor):
            raise ValueError(f"modules_to_save weight {'/'.join(entry.path)} is 4-bit")
        layers = range(model.config.num_hidden_layers) if entry.layered else [None]
        for i in layers:
            w = v[i] if entry.layered else v
            add(entry.key.format(i=i) if entry.layered else entry.key,
                jnp.asarray(w).T if entry.linear else w)
    config = _peft_config(model, plan.config, plan, base_model_name_or_path)
    if convert:
        config = _converted_config(config)
    with atomic_directory(out_dir) as tmp:
        write_safetensors(os.path.join(tmp, WEIGHTS_NAME), specs, metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
    return out_dir


def _normalise(key: str) -> str:
    if key.startswith(PREFIX):
        key = key[len(PREFIX):]
    for seg in (".modules_to_save.default.", ".modules_to_save."):
        key = key.replace(seg, ".")
    for ab in ("lora_A", "lora_B"):
        key = key.replace(f".{ab}.default.weight", f".{ab}.weight")
    key = key.replace(f".{PEFT_MAGNITUDE}.default.weight", f".{PEFT_MAGNITUDE}")
    key = key.replace(f".{PEFT_MAGNITUDE}.default", f".{PEFT_MAGNITUDE}")
    return key


def lora_config_from_peft(cfg: dict[str, Any], source: str = "adapter_config.json") -> LoraConfig:
    """A LoraConfig from a PEFT ``adapter_config.json`` dict (unsupported features raise)."""
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{source}: peft_type {cfg.get('peft_type')!r} is not supported (LORA only)")
    unsupported = [(k, cfg.get(k)) for k, ok in (
        ("bias", ("none", None)), ("fan_in_fan_out", (False, None)),
        ("layers_to_transform", (None,)), ("layer_replication", (None,)),
        ("target_parameters", (None,)), ("lora_bias", (False, None)))
        if cfg.get(k) not in ok]
    if unsupported:
        raise ValueError(f"{source}: unsupported PEFT settings {unsupported}; qlora_jax reads "
                         "LoRA and DoRA adapters (bias='none', no layer selection)")
    init = cfg.get("init_lora_weights", True)
    # PiSSA/OLoRA: the base is made residual again on load (as PEFT does); others as default.
    init = init if init in (True, False, "gaussian", "pissa", "olora") else True
    return LoraConfig(r=int(cfg.get("r", 8)), alpha=cfg.get("lora_alpha", 8),
                      dropout=float(cfg.get("lora_dropout", 0.0) or 0.0),
                      target_modules=cfg.get("target_modules"), init=init,
                      use_rslora=bool(cfg.get("use_rslora", False)),
                      use_dora=bool(cfg.get("use_dora", False)),
                      rank_pattern=dict(cfg.get("rank_pattern") or {}),
                      alpha_pattern=dict(cfg.get("alpha_pattern") or {}),
                      modules_to_save=tuple(cfg.get("modules_to_save") or ()))


def load_peft(model: Any, params: dict, adapter_dir: str) -> tuple[Any, dict]:
    """Reads a PEFT LoRA adapter into ``params``; returns the model carrying its LoraConfig.

    Existing adapters in ``params`` are replaced. ``modules_to_save`` weights in
    the file replace the base weights and are boxed as trainable. An adapter made with
    ``init_lora_weights="pissa"``/``"olora"`` expects the original base and turns it into
    the residual ``W - s B0 A0`` first, as PEFT does on load.

    Raises:
      FileNotFoundError: no adapter_config.json / adapter_model.safetensors.
      ValueError: unsupported PEFT settings; a tensor whose shape differs from
        this base (named, with both shapes: an adapter for another base);
        tensors that fit no module of this model; targets matching nothing.
      KeyError: a tensor the adapter's config implies is missing.
    """
    adapter_dir = os.fspath(adapter_dir)
    cfg_path = os.path.join(adapter_dir, CONFIG_NAME)
    w_path = os.path.join(adapter_dir, WEIGHTS_NAME)
    if not os.path.isdir(adapter_dir):
        raise FileNotFoundError(f"adapter directory not found: {adapter_dir!r}")
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            extra = " (only safetensors adapters are supported)" if p == w_path and \
                os.path.isfile(os.path.join(adapter_dir, "adapter_model.bin")) else ""
            raise FileNotFoundError(f"{adapter_dir!r} has no {os.path.basename(p)}{extra}")
    with open(cfg_path) as f:
        cfg = json.load(f)
    lora = lora_config_from_peft(cfg, cfg_path)
    names = [n for s in model.module_sites() for n in s.hf_names]
    # PEFT adds its task's head names ("classifier", "score") to modules_to_save on its own.
    mts = tuple(m for m in lora.modules_to_save
                if any(module_names.matches(n, m) for n in names))
    lora = lora.replace(modules_to_save=mts)
    new_model = model.clone(lora=lora)
    plan = new_model.lora_plan()
    file = SafetensorsFile(w_path)
    keys = {_normalise(k): k for k in file.keys()}
    flat = {p: v for p, v in flatten(unbox(params)).items() if not is_adapter_path(p)}
    sites = _sites_by_path(new_model)
    used: set[str] = set()
    if lora.init in ("pissa", "olora"):
        # PEFT loads such an adapter onto the original base and decomposes it again.
        flat = flatten(lora_init.initialize(new_model, unflatten(flat)))

    def read(name: str, want: tuple[int, ...]) -> np.ndarray:
        if name not in keys:
            raise KeyError(f"{w_path}: the adapter lacks tensor {PREFIX + name!r}, which its "
                           "adapter_config.json implies for this model")
        raw = keys[name]
        got = tuple(file.shape(raw))
        if got != tuple(want):
            raise ValueError(f"{w_path}: tensor {raw!r} has shape {list(got)}, but this base "
                             f"model needs {list(want)}: an adapter made for another base model?")
        used.add(name)
        return file.get(raw)

    for path, spec in plan.specs:
        in_f, out_f = _kernel_in_out(flat[path + ("kernel",)])
        hf = sites[path].hf_names
        a = [read(f"{n}.lora_A.weight", (spec.r, in_f)).astype(np.float32).T for n in hf]
        b = [read(f"{n}.lora_B.weight", (out_f, spec.r)).astype(np.float32).T for n in hf]
        kernel = getattr(flat[path + ("kernel",)], "value", flat[path + ("kernel",)])
        stacked = len(kernel.shape) == 3  # layers stacked by nn.scan (also for one layer)
        flat[path + ("lora_a",)] = jnp.asarray(np.stack(a) if stacked else a[0])
        flat[path + ("lora_b",)] = jnp.asarray(np.stack(b) if stacked else b[0])
        if spec.use_dora:
            m = [read(f"{n}.{PEFT_MAGNITUDE}", (out_f,)).astype(np.float32) for n in hf]
            flat[path + (MAGNITUDE,)] = jnp.asarray(np.stack(m) if stacked else m[0])
    for entry in _saved_entries(new_model, plan):
        base = flat[entry.path]
        layers = range(model.config.num_hidden_layers) if entry.layered else [None]
        names_i = [entry.key.format(i=i) if entry.layered else entry.key for i in layers]
        if all(n in keys for n in names_i):
            per = base.shape[1:] if entry.layered else base.shape
            want = tuple(reversed(per)) if entry.linear else tuple(per)
            ws = [read(n, want) for n in names_i]
            ws = [w.T if entry.linear else w for w in ws]
            value = np.stack(ws) if entry.layered else ws[0]
            flat[entry.path] = jnp.asarray(value.astype(np.dtype(base.dtype)))
    for p, v in list(flat.items()):
        if plan.saves(p[:-1]):
            flat[p] = Trainable(v)
    unused = [keys[k] for k in keys if k not in used]
    if unused:
        raise ValueError(f"{w_path}: {len(unused)} tensor(s) fit no module of this "
                         f"{type(model).__name__} under the adapter's config, e.g. {unused[:3]}: "
                         "an adapter made for another base model?")
    return new_model, unflatten(flat)
