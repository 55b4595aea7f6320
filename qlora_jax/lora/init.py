"""Data-aware adapter initialisations (PEFT's PiSSA, OLoRA and LoftQ) as functions of the weight.

Each starts from a frozen weight ``W`` ``[out, in]`` (PyTorch layout, float32) and returns
PEFT-layout adapters ``A`` ``[R, in]``, ``B`` ``[out, R]`` and a new base weight:

- ``pissa``: the top-R singular triplets ``W = U S V^T``: ``B = U_R sqrt(S_R / s)``,
  ``A = sqrt(S_R / s) V_R^T`` (``s`` the LoRA scaling), base ``W - s B A``; with
  ``niter`` (``"pissa_niter_K"``) a randomized SVD with K subspace iterations (Halko et al.,
  as ``torch.svd_lowrank`` with ``q = R``).
- ``olora``: ``W = Q R`` (reduced QR): ``B = Q[:, :R]``, ``A = R[:R]``, base ``W - s B A``.
- ``loftq``: alternate 4-bit quantization and a rank-R SVD fit of the quantization residual
  (LoftQ, Li et al. 2023): ``W ~ dequant(Q) + s B A``; the base is the 4-bit ``Q``.

PiSSA and OLoRA leave ``base + s B A = W`` (outputs unchanged up to rounding). PEFT's LoftQ
ignores the scaling (its adapters assume ``s = 1``); here the singular values are divided by
``s`` as in PiSSA, which equals PEFT's adapters when ``alpha == r`` and stays exact otherwise.

``init_kernel`` applies one to a params-tree kernel (float ``[..., in, out]`` or a QTensor
``[..., out, in]``, layers stacked on leading axes) and returns the kernel and the adapters in
our layout (``lora_a`` ``[..., in, R]``, ``lora_b`` ``[..., R, out]``). A 4-bit kernel is
dequantized, decomposed and its residual requantized with the same settings (PEFT's OLoRA on a
bitsandbytes base; PEFT refuses PiSSA there). ``initialize`` does it over a params tree.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.lora import dora
from qlora_jax.lora.config import LoraSpec, data_aware
from qlora_jax.quant.blockwise import dequantize_xla, quantize, quantize_like
from qlora_jax.quant.config import QuantConfig
from qlora_jax.quant.qtensor import QTensor

Array = jax.Array
# LoftQ's own quantization on a float base: PEFT's (NF4, block 64, no nested scales).
LOFTQ_FLOAT_BASE = QuantConfig(qtype="nf4", block_size=64, double_quant=False)

def pissa_niter(init: str) -> Optional[int]:
    """K of ``"pissa_niter_K"``, None for ``"pissa"`` (full SVD)."""
    m = re.fullmatch(r"pissa_niter_(\d+)", init)
    return int(m.group(1)) if m else None

def svd_lowrank(w: Array, r: int, niter: int, key: Array) -> tuple[Array, Array, Array]:
    """Rank-r randomized SVD ``w ~ U diag(S) V^T`` with ``niter`` subspace iterations.

    Halko, Martinsson and Tropp (2011), Algorithm 4.4, with ``q = r`` columns (no
    oversampling), as ``torch.svd_lowrank(w, q=r, niter=niter)``. Returns U ``[out, r]``,
    S ``[r]``, V ``[in, r]``.
    """
    omega = jax.random.normal(key, (w.shape[1], r), w.dtype)
    q, _ = jnp.linalg.qr(w @ omega)
    for _ in range(niter):
        q, _ = jnp.linalg.qr(w.T @ q)
        q, _ = jnp.linalg.qr(w @ q)
    u, s, vh = jnp.linalg.svd(q.T @ w, full_matrices=False)
    return q @ u, s, vh.T

@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def pissa(w: Array, r: int, scaling: float, niter: Optional[int] = None,
          key: Optional[Array] = None) -> tuple[Array, Array, Array]:
    """PiSSA: ``(A [R, in], B [out, R], W - s B A)`` from the top-R singular triplets of W."""
    w = jnp.asarray(w, jnp.float32)
    if niter is None:
        u, s, vh = jnp.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, v = svd_lowrank(w, r, niter, key if key is not None else jax.random.PRNGKey(0))
        vh = v.T
    root = jnp.sqrt(s / scaling)
    a = root[:, None] * vh
    b = u * root[None, :]
    return a, b, w - scaling * (b @ a)

@functools.partial(jax.jit, static_argnums=(1, 2))
def olora(w: Array, r: int, scaling: float) -> tuple[Array, Array, Array]:
    """OLoRA: ``(A = R[:R], B = Q[:, :R], W - s B A)`` from the reduced QR of W."""
    w = jnp.asarray(w, jnp.float32)
    q, rr = jnp.linalg.qr(w)
    a, b = rr[:r], q[:, :r]
    return a, b, w - scaling * (b @ a)

def _fit(res: Array, r: int, scaling: float) -> tuple[Array, Array]:
    u, s, vh = jnp.linalg.svd(res, full_matrices=False)
    root = jnp.sqrt(s[:r] / scaling)
    return root[:, None] * vh[:r], u[:, :r] * root[None, :]

@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def loftq(w: Array, r: int, scaling: float, quant: QuantConfig,
          num_iter: int = 1) -> tuple[Array, Array, QTensor]:
    """LoftQ: ``(A [R, in], B [out, R], Q)`` with ``W ~ dequant(Q) + s B A``.

    ``num_iter`` rounds of: quantize ``W - s B A`` (B A zero at first), then fit ``s B A``
    to ``W - dequant(Q)`` with a rank-R SVD (PEFT's ``loftq_init`` order: the last
    round's Q and the fit of its residual are returned).
    """
    if num_iter < 1:
        raise ValueError(f"loftq_iter must be >= 1, got {num_iter}")
    w = jnp.asarray(w, jnp.float32)
    target = w
    for i in range(num_iter):
        q = quantize(target, quant.qtype, quant.block_size, quant.double_quant,
                     quant.nested_block_size)
        a, b = _fit(w - dequantize_xla(q, jnp.float32), r, scaling)
        target = w - scaling * (b @ a)
    return a, b, q

def _stack(items: list, stack: tuple[int, ...]) -> Any:
    if not stack:
        return items[0]
    return jax.tree.map(lambda *xs: jnp.stack(xs).reshape(stack + xs[0].shape), *items)

def init_kernel(spec: LoraSpec, kernel: Any, key: Array, quant: Optional[QuantConfig] = None,
                loftq_iter: int = 1, path: str = "") -> tuple[Any, Array, Array]:
    """Applies ``spec.init`` (pissa / pissa_niter_K / olora / loftq) to one params-tree kernel.

    Args:
      spec: the module's LoraSpec (its ``init`` must be data-aware).
      kernel: float ``[..., in, out]`` or a QTensor ``[..., out, in]`` (leading stack axes).
      key: randomness of ``pissa_niter_K`` (one key a layer is split from it).
      quant: quantize the new base with these settings (float kernels only; a QTensor keeps
        its own). None: the base stays float (for LoftQ: the dequantized 4-bit values, as PEFT
        writes them into a float model, quantized with ``LOFTQ_FLOAT_BASE``).
      loftq_iter: LoftQ's alternating rounds.
      path: the module's name, for error messages.

    Returns:
      ``(kernel, lora_a [..., in, R], lora_b [..., R, out])``: the kernel float ``[..., in,
      out]`` in its dtype, or a QTensor ``[..., out, in]``; adapters float32.
    """
    init = spec.init
    if not data_aware(init):
        raise ValueError(f"init_kernel: init={init!r} does not depend on the weight")
    is_q = isinstance(kernel, QTensor)
    if is_q and init == "loftq":
        raise ValueError(f"{path}: init='loftq' needs the float weights, but this kernel is "
                         "already 4-bit (a bitsandbytes checkpoint?); load a float checkpoint "
                         "with quant=QuantConfig(...)")
    if is_q:
        stack = kernel.stack_shape
        w_all = dequantize_xla(kernel, jnp.float32)  # [..., out, in]
    else:
        stack = tuple(kernel.shape[:-2])
        w_all = jnp.swapaxes(jnp.asarray(kernel, jnp.float32), -1, -2)
    n = int(np.prod(stack)) if stack else 1
    w_flat = w_all.reshape((n,) + w_all.shape[-2:])
    if spec.r > min(w_flat.shape[-2:]):
        raise ValueError(f"{path}: init={init!r} needs r <= min(out, in) = "
                         f"{min(w_flat.shape[-2:])}, got r={spec.r}")
    keys = jax.random.split(key, n)
    a_s, b_s, bases = [], [], []
    for i in range(n):
        w = w_flat[i]
        if init == "olora":
            a, b, base = olora(w, spec.r, spec.scaling)
        elif init == "loftq":
            a, b, base = loftq(w, spec.r, spec.scaling, quant or LOFTQ_FLOAT_BASE, loftq_iter)
        else:
            a, b, base = pissa(w, spec.r, spec.scaling, pissa_niter(init), keys[i])
        a_s.append(a.T)
        b_s.append(b.T)
        bases.append(base)
    lora_a, lora_b = _stack(a_s, stack), _stack(b_s, stack)
    if init == "loftq":
        q = _stack(bases, stack)
        if quant is not None:
            return q, lora_a, lora_b
        return jnp.swapaxes(dequantize_xla(q, jnp.float32), -1, -2).astype(kernel.dtype), \
            lora_a, lora_b
    base = _stack(bases, stack)  # [..., out, in] float32
    if is_q:
        return quantize_like(base.astype(kernel.dtype), kernel), lora_a, lora_b
    if quant is not None:
        qs = [quantize(bases[i].astype(kernel.dtype), quant.qtype, quant.block_size,
                       quant.double_quant, quant.nested_block_size) for i in range(n)]
        return _stack(qs, stack), lora_a, lora_b
    return jnp.swapaxes(base, -1, -2).astype(kernel.dtype), lora_a, lora_b

def initialize(model: Any, params: dict, seed: int = 0,
               quant: Optional[QuantConfig] = None) -> dict:
    """Re-initialises every adapter whose spec asks for a data-aware init, over a params tree.

    The kernels of those modules change (PiSSA/OLoRA: the residual; LoftQ: the 4-bit base);
    other leaves are kept. ``quant`` quantizes the new float kernels of modules the model
    quantizes (``model.quantized_paths()``); QTensor kernels keep their settings.
    """
    from qlora_jax.lora.tree import flatten, unflatten

    plan = model.lora_plan()
    if plan is None:
        return params
    flat = flatten(params)
    qpaths = set(model.clone(quant=quant).quantized_paths()) if quant is not None else set()
    root = jax.random.PRNGKey(seed)
    for idx, (path, spec) in enumerate(plan.specs):
        if not data_aware(spec.init):
            continue
        kernel = flat[path + ("kernel",)]
        k, a, b = init_kernel(spec, kernel, jax.random.fold_in(root, idx),
                              quant if path in qpaths else None,
                              plan.config.loftq_iter, "/".join(path))
        flat[path + ("kernel",)], flat[path + ("lora_a",)], flat[path + ("lora_b",)] = k, a, b
        if spec.use_dora:  # DoRA's magnitude starts at the norm of the new W + s B A
            flat[path + (dora.MAGNITUDE,)] = dora.weight_norm(k, a, b, spec.scaling)
    return unflatten(flat)
