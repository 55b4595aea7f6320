"""Fixtures: tiny Llama-family checkpoints written by transformers (one a session and variant)."""

from __future__ import annotations

import pytest

from tests.conftest import run_seed


@pytest.fixture(scope="session")
def llama_ckpt(tmp_path_factory):
    """``llama_ckpt(variant) -> (directory, torch model)``, written once a session."""
    cache: dict[str, tuple[str, object]] = {}

    def get(variant: str):
        from tests.models import tiny  # imports torch and transformers (skips without them)

        if variant not in cache:
            # Replayable like the rng fixture: QLORA_JAX_SEED fixes the checkpoints too.
            seed = run_seed() % (1 << 31)
            print(f"llama_ckpt {variant}: weights seed {seed}")
            d = str(tmp_path_factory.mktemp(f"{variant}_{seed}"))
            cache[variant] = (d, tiny.write_llama(d, variant, seed))
        return cache[variant]

    return get
