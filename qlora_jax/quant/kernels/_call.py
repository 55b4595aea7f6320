"""The plumbing the Triton-style kernels share: interpret or compiled, compiler parameters, the
device's SM count, a 4-bit weight's kernel inputs and refs, an aliased output buffer, the
first row of one layer of a stacked weight read in place, and tile overrides from the
environment (tuning runs)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.quant import codebooks
from qlora_jax.quant.kernels import _decode as dec
from qlora_jax.quant.qtensor import QTensor

try:
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    plgpu = None


def interpret() -> bool:
    return jax.default_backend() not in ("gpu", "cuda", "rocm")


def params(num_warps: int, num_stages: int, interpret: bool) -> dict:
    if interpret or plgpu is None:
        return dict(interpret=True)
    return dict(compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages))


def num_sms() -> int:
    try:
        return int(getattr(jax.devices()[0], "core_count", 132) or 132)
    except Exception:  # pragma: no cover
        return 132


def q_inputs(q: QTensor, packed: jax.Array, absmax: jax.Array) -> list:
    """The kernel inputs for a weight (packed and absmax already laid out; the nested absmax
    and offset flat, so a stack of layers passes every layer's)."""
    table = jnp.asarray(codebooks.codebook(q.qtype))
    if not q.double_quant:
        return [packed, absmax, table]
    return [packed, absmax, q.nested_absmax.astype(jnp.float32).reshape(-1),
            jnp.reshape(q.offset, (-1,)).astype(jnp.float32), table,
            jnp.asarray(codebooks.DYNAMIC_MAP)]


def qrefs(refs: list, q_static: tuple, lut: str, exact: bool) -> dec.QRefs:
    qtype, double_quant, nested_block_size, n_nested = q_static
    return dec.QRefs(refs, double_quant=double_quant, nested_block_size=nested_block_size,
                     n_nested=n_nested, table=codebooks.codebook(qtype), lut=lut, exact=exact)


def q_static(q: QTensor) -> tuple:
    n_nested = int(q.nested_absmax.shape[-1]) if q.double_quant else 1
    return (q.qtype, q.double_quant, q.nested_block_size, n_nested)


def with_out(inputs: list, out_shape: jax.ShapeDtypeStruct, out: Optional[jax.Array]):
    """Appends an aliased output buffer (tests pass a poisoned one) to the inputs."""
    if out is None:
        return inputs, {}
    if out.shape != out_shape.shape or out.dtype != out_shape.dtype:
        raise ValueError(f"out buffer is {out.shape} {out.dtype}, expected "
                         f"{out_shape.shape} {out_shape.dtype}")
    return inputs + [out], {len(inputs): 0}


def weight_2d(q: QTensor) -> list:
    """The kernel inputs of a 2-D weight; a stack of L layers as ``[L * N, ...]`` rows (free
    reshapes of the contiguous row-major arrays)."""
    n, k = q.logical_shape
    layers = int(np.prod(q.stack_shape)) if q.stack_shape else 1
    return q_inputs(q, q.packed.reshape(layers * n, k // 2),
                     q.absmax.reshape(layers * n, k // q.block_size))


def as_words(packed: jax.Array) -> jax.Array:
    """Packed codes ``[R, C]`` uint8 as uint32 words ``[R, C // 4]`` (a free bitcast)."""
    return jax.lax.bitcast_convert_type(packed.reshape(packed.shape[0], packed.shape[1] // 4, 4),
                                        jnp.uint32)


def layer_base(refs: list, nq: int, qrefs: dec.QRefs, q_static: tuple, n_rows: int,
                layered: bool) -> Any:
    """The first row of this weight in the packed/absmax refs: 0, or for a layer of a stack
    read in place (``layered``; the layer index in a one-element ref after the weight's refs)
    ``layer * n_rows``, with the nested-absmax and offset positions moved to that layer."""
    if not layered:
        return 0
    layer = refs[1 + nq][0]
    qrefs.nested_base, qrefs.offset_index = layer * q_static[3], layer
    return layer * n_rows


def split_count(split: Optional[int], waves: int, cap: int, programs: int, tiles: int,
                interpret: bool) -> int:
    """Programs along a kernel's reduction axis: ``split`` when given (at most ``tiles``), 1 in
    interpret mode, else enough for ~``waves`` programs an SM, at most ``cap`` and ``tiles``."""
    if split is not None:
        return max(1, min(split, tiles))
    if interpret:
        return 1
    want = -(-waves * num_sms() // max(programs, 1))
    return max(1, min(want, tiles, cap))


def env_overrides(config: Any, env: str) -> Any:
    """``config`` (a dataclass of tiles) with the fields named in the environment variable
    ``env`` (``rows=64,blocks=2,lut=prmt_bf16,...``: ints, True/False/None, or strings)
    replaced; unchanged when it is unset. For tuning runs (benchmarks record the variable)."""
    spec = os.environ.get(env, "").strip()
    if not spec:
        return config
    names = {f.name for f in dataclasses.fields(config)}
    kw: dict = {}
    for item in spec.split(","):
        k, _, v = item.partition("=")
        if k not in names:
            raise ValueError(f"{env}: unknown field {k!r}; fields: {sorted(names)}")
        kw[k] = {"True": True, "False": False, "None": None}.get(v, v)
        if isinstance(kw[k], str) and v.lstrip("-").isdigit():
            kw[k] = int(v)
    return dataclasses.replace(config, **kw)
