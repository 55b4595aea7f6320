"""benchmarks/sass_lab.py: the Triton IR taken out of a CUDA lowering (jaxlib only, on CPU),
the SASS profile parser, and (where the Triton package is installed) the whole compile."""

import json

import pytest

from benchmarks import sass_lab

SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_CTAID.X ;
        /*0020*/                   PRMT R7, R7, 0x20, R7 ;
        /*0030*/              @!P0 LOP3.LUT R14, R12, 0x7, RZ, 0xc0, !PT ;
        /*0040*/                   PRMT R8, R7, 0x20, R7 ;
        /*0050*/                   FFMA R2, R3, R4, R2 ;
        /*0060*/               @P1 BRA 0x20 ;
        /*0070*/                   EXIT ;
        /*0080*/                   BRA 0x80;
"""


def test_profile_counts_the_main_loop():
    prof = sass_lab.profile(SASS)
    assert prof["instructions"] == 9
    assert prof["loop_instructions"] == 5  # 0x20 .. 0x60, the branch included
    assert dict(prof["top"]) == {"PRMT": 2, "LOP3": 1, "FFMA": 1, "BRA": 1}


@pytest.mark.parametrize("kernel", ["gemv", "tiled", "dequant"])
def test_triton_ir_of_each_kernel(kernel):
    with pytest.raises(SystemExit, match="no field 'tiles'"):
        sass_lab.kernel_call(kernel, (256, 512), 8, {"tiles": 3})
    fn, args, per_thread = sass_lab.kernel_call(kernel, (256, 512), 8)
    bytecode, warps, stages = sass_lab.triton_ir(fn, *args)
    assert bytecode[:4] == b"ML\xefR"  # MLIR bytecode
    text = sass_lab.ttir_text(bytecode)
    assert "tt.func" in text and "tt.load" in text
    assert warps in (2, 4, 8) and stages >= 1 and per_thread > 0


def test_whole_compile_where_triton_is_installed(tmp_path, capsys):
    pytest.importorskip("triton")
    sass_lab.main(["--kernel", "gemv", "--shape", "1024,4096", "--config", "num_stages=2",
                   "--out", str(tmp_path)])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["sass_instructions"] > 100 and row["instructions_per_element"] > 1
    assert row["num_stages"] == 2 and row["config"] == {"num_stages": 2}
    assert 0 < row["issue_limited_us"] < 100
    assert (tmp_path / "gemv_1024x4096" / "kernel.sass").stat().st_size > 0


def test_bad_input_and_a_missing_triton_stop_before_any_lowering(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        sass_lab.main(["--shape", "256,500"])
    assert "K a multiple of 64" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "triton", None)  # import triton fails
    monkeypatch.setattr(sass_lab, "triton_ir", lambda *a: pytest.fail("lowered before the check"))
    with pytest.raises(SystemExit, match="needs the Triton Python package"):
        sass_lab.main(["--kernel", "gemv", "--shape", "256,512"])


def test_lowering_digest_names_the_gpu_program(monkeypatch):
    """Equal for the same program (source locations left out), different when a tile changes."""
    import jax
    import jax.numpy as jnp

    import qlora_jax as qj
    from qlora_jax.quant.kernels import gpu

    monkeypatch.delenv("QLORA_JAX_MATMUL_CONFIG", raising=False)
    q = jax.eval_shape(lambda w: qj.quant.quantize(w, "nf4", 64, True),
                       jax.ShapeDtypeStruct((256, 512), jnp.float32))
    x = jax.ShapeDtypeStruct((8, 512), jnp.bfloat16)

    def fn(v, w):
        return gpu.linear(v, w, interpret=False)

    first = sass_lab.lowering_digest(fn, x, q)
    assert sass_lab.lowering_digest(fn, x, q) == first
    monkeypatch.setenv("QLORA_JAX_MATMUL_CONFIG", "num_stages=2")
    assert sass_lab.lowering_digest(fn, x, q) != first
