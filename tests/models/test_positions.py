"""Rows longer than max_position_embeddings: RoPE models compute any position (as transformers
does), BERT-family models refuse them with one clear error instead of NaN outputs."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import qlora_jax as qj
from tests.models import tiny
from tests.models.conftest import llama_ckpt  # noqa: F401  (fixture)

torch = pytest.importorskip("torch")


def test_llama_beyond_max_position_embeddings_equals_transformers(llama_ckpt, rng):
    path, ref = llama_ckpt("llama_gqa")
    model, params = qj.from_pretrained(path, dtype=jnp.float32)
    t = model.config.max_position_embeddings + 40
    ids = rng.integers(3, tiny.VOCAB, (1, t))
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
    with torch.no_grad():
        want = ref(torch.as_tensor(ids)).logits.numpy()
    assert np.isfinite(ours).all()
    assert tiny.rel_err(ours, want) < 1e-4
    # The positions past max_position_embeddings on their own (not drowned in the row error).
    assert tiny.rel_err(ours[:, -20:], want[:, -20:]) < 1e-4


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_bert_refuses_rows_longer_than_its_positions(tmp_path, model_type, rng):
    tiny.write_bert(str(tmp_path), model_type, seed=int(rng.integers(1 << 30)))
    model, params = qj.from_pretrained(str(tmp_path), dtype=jnp.float32)
    c = model.config
    limit = c.max_position_embeddings - (c.pad_token_id + 1 if model_type == "roberta" else 0)
    ok = rng.integers(3, 100, (1, limit))
    assert np.isfinite(np.asarray(model.apply({"params": params}, jnp.asarray(ok)))).all()
    with pytest.raises(ValueError, match=f"{limit + 1} tokens exceed the {limit} learned"):
        model.apply({"params": params}, jnp.asarray(rng.integers(3, 100, (1, limit + 1))))
