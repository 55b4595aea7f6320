"""model.remat="auto": the fastest policy whose compiled step fits; clear error when none does."""

from __future__ import annotations

import io
import os

import jax
import pytest

from experiments import smoke
from qlora_jax.train import build, loop
from qlora_jax.train import remat as remat_auto
from qlora_jax.train.config import ConfigError
from qlora_jax.train.state import create_state
from qlora_jax.train.step import make_train_step

GIB = 2**30


def test_choose_takes_the_fastest_that_fits_in_speed_order():
    assert remat_auto.SPEED_ORDER == ("none", "dots_saveable", "attention", "qkv", "full",
                                      "full_offload", "offload")
    peaks = {"none": 9 * GIB, "dots_saveable": 7 * GIB, "attention": 5 * GIB, "qkv": 4 * GIB,
             "full": 2 * GIB, "full_offload": 1.5 * GIB, "offload": GIB}
    asked = []

    def peak_of(mode):
        asked.append(mode)
        return peaks[mode]

    choice = remat_auto.choose(peak_of, int(4.5 * GIB), "test")
    assert choice.mode == "qkv" and asked == ["none", "dots_saveable", "attention", "qkv"]
    line = choice.describe()
    assert "chose 'qkv'" in line and "none 9.00 GiB" in line and "qkv 4.00 GiB" in line
    # No budget: the fastest, nothing compiled.
    asked.clear()
    assert remat_auto.choose(peak_of, None, "no limit").mode == "none" and asked == []
    # A policy that fails to compile is skipped and reported.
    def failing(mode):
        if mode == "none":
            raise RuntimeError("boom\nsecond line")
        return peaks[mode]
    choice = remat_auto.choose(failing, 8 * GIB, "test")
    assert choice.mode == "dots_saveable" and "cannot compile: boom second line" in \
        choice.describe()
    with pytest.raises(remat_auto.RematError, match=r"no remat policy fits the memory budget of "
                       r"0.50 GiB.*offload 1.00 GiB.*train.memory_budget_gib"):
        remat_auto.choose(peak_of, GIB // 2, "test")


def test_budget_comes_from_the_config_or_the_device_limit():
    assert remat_auto.memory_budget(1.5) == (int(1.5 * GIB), "train.memory_budget_gib")

    class Dev:
        platform = "gpu"

        def __init__(self, limit):
            self.limit = limit

        def memory_stats(self):
            return {"bytes_limit": self.limit} if self.limit else None

    budget, source = remat_auto.memory_budget(0.0, [Dev(80 * GIB), Dev(40 * GIB)])
    assert budget == int(40 * GIB * (1 - remat_auto.MARGIN)) and "40.00 GiB less 10%" in source
    assert remat_auto.memory_budget(0.0, [Dev(0)])[0] is None
    if jax.default_backend() == "cpu":
        budget, source = remat_auto.memory_budget(0.0)
        assert budget is None and "no memory limit" in source


def _smoke(**fields):
    """The smoke config on a one-layer model, 2 rows a batch (each compile takes a second)."""
    config = smoke.get_config()
    config.train.eval_every, config.train.progress, config.train.batch_size = 0, "lines", 2
    config.model.random.update(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                               num_attention_heads=2, num_key_value_heads=1)
    config.lora.target_modules, config.lora.modules_to_save = "all-linear", ()
    for dotted, value in fields.items():
        section, key = dotted.split("__")
        config[section][key] = value
    return config


@pytest.fixture(scope="module")
def smoke_step():
    """The smoke run's model, state, a batch and its step maker, as the loop builds them."""
    config = _smoke()
    data = build.load_data(config)
    model, params = build.load_model(config)
    tx, schedule = build.make_optimizer(config)
    state = create_state(params, tx, config.train.seed)
    batch = data.train.collate([], config.train.batch_size, config.train.seq_len)

    def make_step(task):
        return make_train_step(task, tx, schedule, dropout=True)
    return config, model, state, batch, make_step


@pytest.mark.slow
def test_auto_on_the_smoke_step_picks_the_fastest_that_fits(smoke_step):
    config, model, state, batch, make_step = smoke_step
    full = remat_auto.compiled_peak(
        make_step(build.make_task(config, model.clone(remat="full"))), state, batch)
    none = remat_auto.compiled_peak(
        make_step(build.make_task(config, model.clone(remat="none"))), state, batch)
    assert full < none   # remat saves memory on this step, so the budget below excludes `none`
    config.train.memory_budget_gib = full / GIB
    chosen, choice = remat_auto.resolve(config, model, make_step, state, batch)
    assert chosen.remat == choice.mode and choice.peaks[choice.mode] <= full
    order = remat_auto.SPEED_ORDER
    faster = order[:order.index(choice.mode)]
    assert list(choice.peaks) == list(faster) + [choice.mode]
    assert choice.peaks["none"] == none
    assert all(not isinstance(choice.peaks[m], int) or choice.peaks[m] > full for m in faster)
    assert order.index(choice.mode) <= order.index("full")


@pytest.mark.slow
def test_auto_with_a_tiny_budget_is_a_clear_error_before_any_file(tmp_path):
    config = _smoke(model__remat="auto", train__memory_budget_gib=1e-6, train__steps=2)
    wd = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"no remat policy fits the memory budget of 0.00 GiB "
                                          r"\(train.memory_budget_gib\); predicted peaks: none"):
        loop.run(config, str(wd))
    assert not os.path.exists(wd)


def test_auto_without_a_limit_runs_the_fastest_and_logs_it(tmp_path):
    if jax.default_backend() != "cpu":
        pytest.skip("the CPU has no memory limit; a GPU's choice depends on the card")
    config = _smoke(model__remat="auto", train__steps=2, train__log_every=1)
    out = io.StringIO()
    loop.run(config, str(tmp_path / "run"), stream=out)
    text = out.getvalue()
    assert "remat=auto chose 'none' (no budget: cpu reports no memory limit" in text
    assert "examples one a row in" in text or "examples packed into" in text
