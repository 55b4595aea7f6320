"""Fixtures: tiny Llama-family checkpoints written by transformers (one a session and variant)."""

from __future__ import annotations

import secrets

import pytest

from tests.models import tiny


@pytest.fixture(scope="session")
def llama_ckpt(tmp_path_factory):
    """``llama_ckpt(variant) -> (directory, torch model)``, written once a session."""
    cache: dict[str, tuple[str, object]] = {}

    def get(variant: str):
        if variant not in cache:
            seed = secrets.randbits(31)
            d = str(tmp_path_factory.mktemp(f"{variant}_{seed}"))
            cache[variant] = (d, tiny.write_llama(d, variant, seed))
        return cache[variant]

    return get
