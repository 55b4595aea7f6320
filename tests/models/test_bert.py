"""BERT family: the real MiniLM checkpoint and tiny BERT/RoBERTa classifiers vs transformers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlora_jax as qj
from qlora_jax.lora import tree as lora_tree
from tests.models import tiny

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _ids(rng, batch, length, vocab, pad_id):
    ids = rng.integers(pad_id + 2, vocab, size=(batch, length))
    mask = np.ones((batch, length), np.int64)
    for b in range(1, batch):
        mask[b, rng.integers(length // 2, length):] = 0  # right padding, as tokenizers do
    ids[mask == 0] = pad_id
    return ids, mask


@pytest.fixture(scope="module")
def minilm_ref(minilm_dir):
    return transformers.AutoModel.from_pretrained(minilm_dir).eval()


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-4), (jnp.bfloat16, 2e-2)])
def test_minilm_hidden_states_and_pooler_equal_transformers(minilm_dir, minilm_ref, dtype, tol,
                                                            rng):
    ids, mask = _ids(rng, 3, 13, 30522, 0)
    with torch.no_grad():
        ref = minilm_ref(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask))
    model, params = qj.from_pretrained(minilm_dir, dtype=dtype)
    hidden, pooled = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m, return_pooled=True))(
        params, jnp.asarray(ids), jnp.asarray(mask))
    assert hidden.shape == (3, 13, 384) and hidden.dtype == dtype
    err = tiny.rel_err(hidden, ref.last_hidden_state.numpy(), mask)
    assert err < tol, f"hidden state relative error {err}"
    assert tiny.rel_err(pooled, ref.pooler_output.numpy()) < tol


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_sequence_classifier_logits_equal_transformers(tmp_path, model_type, rng):
    seed = int(rng.integers(1 << 30))
    ref = tiny.write_bert(str(tmp_path), model_type, seed, num_labels=3)
    pad = ref.config.pad_token_id
    ids, mask = _ids(rng, 3, 10, 120, pad)
    with torch.no_grad():
        want = ref(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
        base = ref.base_model(torch.as_tensor(ids),
                              attention_mask=torch.as_tensor(mask)).last_hidden_state.numpy()
    lora = qj.LoraConfig(r=4, target_modules="all-linear", modules_to_save=("classifier",))
    model, params = qj.from_pretrained(str(tmp_path), dtype=jnp.float32, num_labels=3, lora=lora)
    logits = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m))(
        params, jnp.asarray(ids), jnp.asarray(mask))
    assert logits.shape == (3, 3)
    assert tiny.rel_err(logits, want) < 1e-4
    # The head is trained in full, the encoder through adapters only.
    mask_tree = lora_tree.flatten(qj.lora.trainable_mask(params))
    assert all(v for p, v in mask_tree.items() if p[0] == "classifier")
    assert not any(v for p, v in mask_tree.items() if p[-1] in ("kernel", "bias", "scale",
                                                                  "embedding")
                   and p[0] != "classifier")
    # The same checkpoint read as a bare encoder gives the base model's hidden states.
    enc, enc_params = qj.from_pretrained(str(tmp_path), dtype=jnp.float32)
    hidden = jax.jit(lambda p, i, m: enc.apply({"params": p}, i, m))(
        enc_params, jnp.asarray(ids), jnp.asarray(mask))
    assert tiny.rel_err(hidden, base, mask) < 1e-4


def test_fresh_head_on_a_base_checkpoint(minilm_dir, rng):
    model, params = qj.from_pretrained(minilm_dir, dtype=jnp.float32, num_labels=4)
    assert params["classifier"]["kernel"].shape == (384, 4)
    ids, mask = _ids(rng, 2, 6, 30522, 0)
    logits = jax.jit(lambda p: model.apply({"params": p}, jnp.asarray(ids), jnp.asarray(mask)))(
        params)
    assert logits.shape == (2, 4) and bool(jnp.all(jnp.isfinite(logits)))
