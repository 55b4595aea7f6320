"""Folding adapters into their base weights (merge) and taking them out again (unmerge)."""

from __future__ import annotations

from typing import Any, Optional

import jax.numpy as jnp

from qlora_jax.lora import dora
from qlora_jax.lora.config import LoraConfig
from qlora_jax.lora.params import adapters as get_adapters, is_adapter_path
from qlora_jax.lora.tree import Params, flatten, unbox, unflatten
from qlora_jax.lora.plan import LoraPlan
from qlora_jax.lora.trainable import Trainable
from qlora_jax.quant.blockwise import dequantize_xla, quantize_like
from qlora_jax.quant.qtensor import QTensor


def _plan(model: Any) -> LoraPlan:
    plan_fn = getattr(model, "lora_plan", None)
    plan = plan_fn() if callable(plan_fn) else None
    if plan is None:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters to merge "
                         "(its `lora` is None)")
    return plan


def _delta(a: jnp.ndarray, b: jnp.ndarray, scaling: float) -> jnp.ndarray:
    """scaling * A B in float32, ``[..., in, out]``."""
    return jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32)) * scaling


def _fold(kernel: Any, delta: jnp.ndarray, sign: float) -> Any:
    if isinstance(kernel, QTensor):
        # PEFT on a 4-bit base: dequantize, add, requantize with the same settings.
        w = dequantize_xla(kernel, jnp.float32)
        w = w + sign * jnp.swapaxes(delta, -1, -2)
        return quantize_like(w.astype(kernel.dtype), kernel)
    return (kernel.astype(jnp.float32) + sign * delta).astype(kernel.dtype)


def merge(model: Any, params: Params) -> tuple[Any, Params]:
    """Folds every adapter into its base weight.

    Float base: ``W + scaling * A B`` exactly (in float32, cast back to W's
    dtype). 4-bit base: dequantize, add, requantize with the same qtype, block
    size and nesting (what PEFT does). DoRA: ``(m / ||W + s A B||_row) (W + s A B)``. Returns the model without LoRA and the
    params without adapter leaves (``modules_to_save`` weights kept, unboxed).
    """
    plan = _plan(model)
    flat = flatten(params)
    out = {p: v for p, v in flat.items() if not is_adapter_path(p)}
    for path, spec in plan.specs:
        a, b = flat.get(path + ("lora_a",)), flat.get(path + ("lora_b",))
        if a is None or b is None:
            raise KeyError(f"params lack the adapter of {'/'.join(path)} that the model declares")
        if spec.use_dora:
            m = flat.get(path + (dora.MAGNITUDE,))
            if m is None:
                raise KeyError(f"params lack the DoRA magnitude of {'/'.join(path)}")
            out[path + ("kernel",)] = dora.merged_kernel(flat[path + ("kernel",)], a, b, m,
                                                         spec.scaling)
            continue
        out[path + ("kernel",)] = _fold(flat[path + ("kernel",)], _delta(a, b, spec.scaling), 1.0)
    return model.clone(lora=None), unbox(unflatten(out))


def unmerge(model: Any, params: Params, adapters: Params,
            lora: Optional[LoraConfig] = None,
            weight_norms: Optional[Params] = None) -> tuple[Any, Params]:
    """Takes merged adapters back out: the inverse of ``merge`` for float bases.

    Args:
      model: the merged (plain) model.
      params: its params.
      adapters: the adapter leaves that were merged (e.g. ``qj.lora.adapters(params)``
        taken before merging).
      lora: the LoraConfig they were made with (default: ``model.lora``).

    For a 4-bit base the subtraction is requantized, as in PEFT: not an exact inverse.
    DoRA: ``W = W' n / m - s A B`` needs the norms ``n = ||W + s A B||_row`` of the weight
    before merging (``weight_norms``, ``qj.lora.dora_norms(model, params)`` taken then;
    PEFT keeps them in the layer at merge time): the merged weight alone does not determine
    them.
    """
    lora = lora if lora is not None else getattr(model, "lora", None)
    if lora is None:
        raise ValueError("unmerge needs the LoraConfig the adapters were made with")
    lora_model = model.clone(lora=lora)
    plan = _plan(lora_model)
    flat = flatten(params)
    flat_ad = flatten(get_adapters(adapters))
    for path, spec in plan.specs:
        a, b = flat_ad.get(path + ("lora_a",)), flat_ad.get(path + ("lora_b",))
        if a is None or b is None:
            raise KeyError(f"adapters lack {'/'.join(path)}, which the LoraConfig targets")
        kernel = flat[path + ("kernel",)]
        if spec.use_dora:
            m = flat_ad.get(path + (dora.MAGNITUDE,))
            n = flatten(weight_norms).get(path) if weight_norms is not None else None
            if m is None or n is None:
                raise ValueError(f"unmerge: DoRA adapter {'/'.join(path)} needs its magnitude "
                                 "in `adapters` and weight_norms=qj.lora.dora_norms(model, "
                                 "params) taken before merging")
            w = dora.dense_weight(kernel) * (n / m.astype(jnp.float32))[..., None, :]
            kernel = dora.from_dense(w, kernel)
            flat[path + (dora.MAGNITUDE,)] = m
        flat[path + ("kernel",)] = _fold(kernel, _delta(a, b, spec.scaling), -1.0)
        flat[path + ("lora_a",)] = a
        flat[path + ("lora_b",)] = b
    for p, v in list(flat.items()):
        if plan.saves(p[:-1]) and not isinstance(v, Trainable):
            flat[p] = Trainable(v)
    return lora_model, unflatten(flat)


def dora_norms(model: Any, params: Params) -> Params:
    """``{module path: ||W + s A B||_row}`` of every DoRA module (what ``unmerge`` needs)."""
    plan = _plan(model)
    flat = flatten(unbox(params))
    return unflatten({path: dora.weight_norm(flat[path + ("kernel",)], flat[path + ("lora_a",)],
                                             flat[path + ("lora_b",)], spec.scaling)
                      for path, spec in plan.specs if spec.use_dora})
