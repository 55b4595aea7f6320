"""Static instruction profile of our 4-bit Triton kernels, on any host (no GPU, no ``ncu``).

    python -m benchmarks.sass_lab [--kernel gemv|tiled|dequant] [--shape N,K] [--tokens M]
                                  [--config k=v,...] [--arch 90] [--out DIR]
    python -m benchmarks.sass_lab --digest     # the default kernels' lowerings, to compare trees

Each kernel is lowered by Pallas for CUDA (``jax.export``: the Triton IR our GPU run compiles),
its IR is taken out of the ``__gpu$xla.gpu.triton`` custom call, and the Triton Python package
(``pip install triton``; not a dependency of this project) compiles it for the given SM
architecture with the call's ``num_warps`` / ``num_stages``; the bundled ``cuobjdump`` lists the
SASS. One JSON line a kernel: registers a thread and shared memory a program, SASS
instructions, the main loop's length when there is one, the weight elements a thread handles a
loop step (or in the whole program), the instructions an element and the time to issue them for
the whole weight at an H200's full rate, and the most frequent opcodes. ``--out`` keeps the
TTIR, TTGIR, PTX and SASS for reading.

This is an approximation of what runs on the GPU: the Triton and ptxas of a pip wheel are not
those bundled with jaxlib (session 8: 84 registers here for the GEMV that the H200's profiler
reported at 156), so read the instruction mix and counts, not the register figure, and confirm
timing changes on a GPU (``benchmarks.gemv_lab``).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import tempfile
from typing import Any, Optional

import jax
import jax.numpy as jnp

import qlora_jax as qj
from qlora_jax.quant.kernels import gemv, gpu

# Warp instructions an H100/H200 (SXM) can issue a second: 132 SMs x 4 schedulers x ~1.98 GHz.
ISSUE_PER_S = 132 * 4 * 1.98e9
SASS_LINE = re.compile(r"^\s+/\*[0-9a-f]{4}\*/\s+(@!?U?P[0-9T]\s+)?([A-Z][A-Z0-9_]*)")
ADDRESS = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/")


def cuda_lowering(fn: Any, *args: Any) -> str:
    """``fn``'s StableHLO for CUDA, traced afresh (tiles read from the environment now)."""
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    return jax.export.export(jax.jit(lambda *a: fn(*a)), platforms=["cuda"],
                             disabled_checks=checks)(*args).mlir_module()


def triton_ir(fn: Any, *args: Any, text: Optional[str] = None) -> tuple[bytes, int, int]:
    """The Triton IR (MLIR bytecode) of the only Triton kernel in ``fn``'s CUDA lowering (or in
    its lowering ``text``, already made), with its ``num_warps`` and ``num_stages``."""
    text = cuda_lowering(fn, *args) if text is None else text
    if text.count('ir = "') != 1:
        raise ValueError(f"expected one Triton kernel in the lowering, found {text.count('ir = ')}")
    start = text.index('ir = "') + len('ir = "')
    out, i = bytearray(), start
    while text[i] != '"':  # MLIR string escapes: \XX (hex), \\, \", \n, \t
        if text[i] != "\\":
            out += text[i].encode()
            i += 1
        elif text[i + 1] in '"\\':
            out.append(ord(text[i + 1]))
            i += 2
        elif text[i + 1] in "nt":
            out.append({"n": 10, "t": 9}[text[i + 1]])
            i += 2
        else:
            out.append(int(text[i + 1:i + 3], 16))
            i += 3
    warps = int(re.search(r"num_warps = (\d+)", text).group(1))
    stages = int(re.search(r"num_stages = (\d+)", text).group(1))
    return bytes(out), warps, stages


def ttir_text(bytecode: bytes) -> str:
    """The IR as text, parsed by jaxlib's own MLIR (whose Triton dialect wrote it)."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.triton import dialect as tt
    from jax.interpreters import mlir

    ctx = mlir.make_ir_context()
    tt.register_dialect(ctx)
    with ctx:
        return ir.Module.parse(bytecode).operation.get_asm(enable_debug_info=False)


def _require_triton() -> None:
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as e:
        raise SystemExit("sass_lab needs the Triton Python package (pip install triton); "
                         f"it is not a dependency of qlora_jax ({e})")


def compile_sass(ttir: str, warps: int, stages: int, arch: int, workdir: str) -> dict:
    """Compiles TTIR with the installed Triton package; returns the SASS text and the resource
    line, and leaves ``kernel.{ttir,ttgir,ptx,sass}`` in ``workdir``."""
    _require_triton()
    import triton
    from triton.backends.compiler import GPUTarget

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    src = os.path.join(workdir, "kernel.ttir")
    with open(src, "w") as f:
        f.write(ttir)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    for ext in ("ttgir", "ptx"):
        with open(os.path.join(workdir, f"kernel.{ext}"), "w") as f:
            f.write(k.asm[ext])
    cubin = os.path.join(workdir, "kernel.cubin")
    with open(cubin, "wb") as f:
        f.write(k.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    sass = subprocess.run([tool, "-sass", cubin], check=True, capture_output=True, text=True).stdout
    res = subprocess.run([tool, "-res-usage", cubin], check=True, capture_output=True,
                         text=True).stdout
    with open(os.path.join(workdir, "kernel.sass"), "w") as f:
        f.write(sass)
    return dict(sass=sass, resources=res, shared=int(k.metadata.shared), triton=triton.__version__)


def profile(sass: str) -> dict:
    """Opcode counts of the whole kernel and of its main loop (the longest backward branch)."""
    ops, addrs, branch_to = [], [], {}
    for line in sass.splitlines():
        m, a = SASS_LINE.match(line), ADDRESS.match(line)
        if m and a:
            addr = int(a.group(1), 16)
            target = re.search(r"BRA (?:`\(\.L_x_\d+\) )?0x([0-9a-f]+)", line)
            if m.group(2) == "BRA" and target:
                branch_to[len(ops)] = int(target.group(1), 16)
            ops.append(m.group(2))
            addrs.append(addr)
    loop = None
    for i, to in branch_to.items():  # a branch back to an earlier address
        if to < addrs[i] and to in addrs:
            lo = addrs.index(to)
            if loop is None or i - lo > loop[1] - loop[0]:
                loop = (lo, i)
    body = ops[loop[0]:loop[1] + 1] if loop else ops
    return dict(instructions=len(ops), loop_instructions=len(body) if loop else None,
                top=collections.Counter(body).most_common(12))


def _with(config: Any, overrides: dict) -> Any:
    """``config`` with fields replaced (``--config rows=64,num_stages=2``)."""
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise SystemExit(f"--config: {type(config).__name__} has no field {unknown[0]!r}; "
                         f"fields: {sorted(fields)}")
    return dataclasses.replace(config, **overrides)


def kernel_call(kernel: str, shape: tuple, tokens: int, overrides: Optional[dict] = None
                ) -> tuple[Any, tuple, int]:
    """``(fn, abstract args, weight elements a thread handles a loop step)`` for one kernel with
    its default tiles (``overrides``: fields of its config replaced)."""
    overrides = overrides or {}
    n, k = shape
    q = jax.eval_shape(lambda w: qj.quant.quantize(w, "nf4", 64, True),
                       jax.ShapeDtypeStruct((n, k), jnp.float32))
    if kernel == "gemv":
        c = _with(gemv.default_config(n, k), overrides)
        x = jax.ShapeDtypeStruct((1, k), jnp.bfloat16)
        return (lambda v, w: gemv.gemv_4bit(v, w, c, interpret=False), (x, q),
                c.rows * c.blocks * q.block_size // (c.num_warps * 32))
    if kernel == "tiled":
        c = _with(gpu.default_config(tokens, n, k, False, False), overrides)
        x = jax.ShapeDtypeStruct((tokens, k), jnp.bfloat16)
        return (lambda v, w: gpu.matmul_4bit(v, w, transpose=False, config=c, interpret=False),
                (x, q), c.bn * c.bk // (c.num_warps * 32))
    if kernel == "dequant":
        c = _with(gpu.DequantConfig(), overrides)
        return (lambda w: gpu.dequantize_flat(w, jnp.bfloat16, c, interpret=False), (q,),
                c.elements // (c.num_warps * 32))
    raise ValueError(f"unknown kernel {kernel!r}; expected gemv, tiled or dequant")


def run(kernel: str, shape: tuple, tokens: int, arch: int, out: Optional[str],
        overrides: Optional[dict] = None) -> dict:
    fn, args, per_thread = kernel_call(kernel, shape, tokens, overrides)
    bytecode, warps, stages = triton_ir(fn, *args)
    workdir = os.path.join(out, f"{kernel}_{shape[0]}x{shape[1]}") if out else tempfile.mkdtemp()
    os.makedirs(workdir, exist_ok=True)
    compiled = compile_sass(ttir_text(bytecode), warps, stages, arch, workdir)
    prof = profile(compiled["sass"])
    regs = re.search(r"REG:(\d+)", compiled["resources"])
    body = prof["loop_instructions"] or prof["instructions"]
    return dict(kernel=kernel, shape=list(shape), tokens=tokens if kernel == "tiled" else None,
                config=overrides or None,
                arch=f"sm_{arch}", num_warps=warps, num_stages=stages,
                registers=int(regs.group(1)) if regs else None,
                shared_bytes=compiled["shared"],
                sass_instructions=prof["instructions"],
                loop_instructions=prof["loop_instructions"],
                elements_per_thread=per_thread,
                instructions_per_element=round(body / per_thread, 2),
                # the time to issue them for the whole weight at full rate (a lower bound: the
                # H200 measured the tiled kernel at ~40-45% of it, RESULTS.md session 8)
                issue_limited_us=round(shape[0] * shape[1] * body / per_thread / 32
                                       / ISSUE_PER_S * 1e6, 1),
                top_opcodes=prof["top"], triton=compiled["triton"], jax=jax.__version__)


DIGEST_SHAPES = ((14336, 4096), (4096, 14336), (4096, 4096), (1024, 4096))


def lowering_digest(fn: Any, *args: Any) -> str:
    """A digest of ``fn``'s CUDA lowering: the launch (grid, warps, stages, shapes) and the Triton
    IR as text, without source locations. Equal digests: the GPU compiles the same program."""
    from jax._src.lib.mlir import ir
    from jax.interpreters import mlir

    text = cuda_lowering(fn, *args)
    kernel = ttir_text(triton_ir(fn, text=text)[0])
    with mlir.make_ir_context():  # printed again without locations (they name source files)
        text = ir.Module.parse(text).operation.get_asm(enable_debug_info=False)
    outer = re.sub(r'ir = "(\\.|[^"\\])*"', "ir = IR", text)
    return hashlib.sha1((outer + kernel).encode()).hexdigest()[:12]


def digests() -> dict:
    """Digests of the default kernels at decoding and training shapes (no Triton package
    needed): x @ W.T at 1, 8 and 32 tokens, dy @ W at 8, and the dequantization, on the
    llama-8b weight shapes. Two trees with equal digests run the same GPU code, so a change
    that keeps them needs no new GPU run to prove it (session 8 did this for its refactors)."""
    out = {}
    for n, k in DIGEST_SHAPES:
        q = jax.eval_shape(lambda w: qj.quant.quantize(w, "nf4", 64, True),
                           jax.ShapeDtypeStruct((n, k), jnp.float32))
        for m in (1, 8, 32):
            out[f"linear {n}x{k} m={m}"] = lowering_digest(
                lambda v, w: gpu.linear(v, w, interpret=False),
                jax.ShapeDtypeStruct((m, k), jnp.bfloat16), q)
        out[f"linear_grad_input {n}x{k} m=8"] = lowering_digest(
            lambda v, w: gpu.linear_grad_input(v, w, interpret=False),
            jax.ShapeDtypeStruct((8, n), jnp.bfloat16), q)
        out[f"dequantize {n}x{k}"] = lowering_digest(
            lambda w: gpu.dequantize_flat(w, jnp.bfloat16, interpret=False), q)
    return out


def main(argv: Optional[list] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kernel", action="append", choices=("gemv", "tiled", "dequant"))
    p.add_argument("--shape", default="14336,4096", help="N,K of the weight (out, in)")
    p.add_argument("--tokens", type=int, default=8, help="rows of x for the tiled kernel")
    p.add_argument("--arch", type=int, default=90, help="SM architecture (90: H100, H200)")
    p.add_argument("--config", default="", help="fields of the kernels' configs to replace, as "
                   "k=v,... (e.g. num_stages=2)")
    p.add_argument("--out", default=None, help="keep the IR and SASS here")
    p.add_argument("--digest", action="store_true",
                   help="print digests of the default kernels' CUDA lowerings instead (no "
                   "Triton package needed): compare two trees")
    args = p.parse_args(argv)
    if args.digest:
        print(json.dumps(digests(), indent=1))
        return
    overrides = {k: int(v) if v.lstrip("-").isdigit() else v
                 for k, v in (item.split("=", 1) for item in args.config.split(",") if item)}
    try:
        shape = tuple(int(v) for v in args.shape.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 2 or shape[1] % 64:
        p.error(f"--shape wants N,K with K a multiple of 64, got {args.shape!r}")
    _require_triton()  # before any lowering
    rows = [run(k, shape, args.tokens, args.arch, args.out, overrides)
            for k in (args.kernel or ["gemv", "tiled", "dequant"])]
    for r in rows:
        print(json.dumps(r), flush=True)
    if args.out:
        with open(os.path.join(args.out, "sass_lab.jsonl"), "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
