"""``model.remat="auto"``: the fastest rematerialisation policy whose compiled step fits memory.

Before training, the train step is compiled (not run) with each policy in `SPEED_ORDER`, fastest
first, until one fits; XLA's memory analysis of the compiled step predicts its peak on a device:
arguments + outputs - outputs aliased to the donated state + temporaries (activations included).
The budget is ``train.memory_budget_gib`` when set, else each device's allocator limit
(``memory_stats()["bytes_limit"]``; with JAX's default preallocation 75% of the GPU's memory)
less `MARGIN`. A device that reports no limit (the CPU) and no budget: the fastest policy, ``none``,
without compiling anything.

Speed order (measured, llama-8b NF4, 1 x 2048 tokens, r16, one H100; benchmarks/RESULTS.md):
``none`` recomputes nothing; ``dots_saveable`` keeps every matmul output (11,986 tokens/s at
16.4 GiB); ``attention`` and ``qkv`` keep a layer's attention output or q/k/v; ``full`` keeps
only each layer's input (10,600-10,900 tokens/s at 7.3 GiB); ``full_offload`` keeps those inputs
in host memory (each crosses PCIe twice, overlapped with the layers' compute: for long rows, whose
inputs alone outgrow the device); ``offload`` keeps matmul outputs in host memory (slowest: every
saved activation crosses PCIe twice, and the layer inputs stay on the device).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax

from qlora_jax.models.common import REMAT_MODES

#: Remat policies from fastest to slowest (see the module docstring).
SPEED_ORDER = ("none", "dots_saveable", "attention", "qkv", "full", "full_offload",
               "offload")
#: The values of ``model.remat``: a policy, or "auto".
CHOICES = REMAT_MODES + ("auto",)
#: Share of the device's memory limit kept free (fragmentation, the eval step, host transfers).
MARGIN = 0.10

GIB = 2**30


class RematError(ValueError):
    """No remat policy fits the memory budget."""


@dataclasses.dataclass(frozen=True)
class Choice:
    """The chosen policy and what was measured to choose it.

    Attributes:
      mode: the chosen remat mode.
      peaks: predicted peak bytes a device of each policy compiled (in `SPEED_ORDER`), or the
        one-line reason it could not be compiled.
      budget: the budget in bytes (None: no limit known).
      source: where the budget comes from.
    """

    mode: str
    peaks: dict[str, Any]
    budget: Optional[int]
    source: str

    def describe(self) -> str:
        """One log line: the choice, the budget and every compiled alternative's peak."""
        shown = ", ".join(f"{m} {v / GIB:.2f} GiB" if isinstance(v, (int, float)) else f"{m} ({v})"
                          for m, v in self.peaks.items())
        budget = "no budget" if self.budget is None else f"budget {self.budget / GIB:.2f} GiB"
        return (f"remat=auto chose {self.mode!r} ({budget}: {self.source}); predicted peaks: "
                f"{shown or 'none compiled'}; speed order {' > '.join(SPEED_ORDER)}")


def memory_budget(budget_gib: float, devices: Optional[list[Any]] = None
                  ) -> tuple[Optional[int], str]:
    """(bytes, source): ``budget_gib`` when > 0, else the smallest device limit less `MARGIN`."""
    if budget_gib and budget_gib > 0:
        return int(budget_gib * GIB), "train.memory_budget_gib"
    limits = []
    for d in devices if devices is not None else jax.local_devices():
        try:
            limit = (d.memory_stats() or {}).get("bytes_limit")
        except Exception:  # backends without statistics raise
            limit = None
        if not limit:
            return None, f"{d.platform} reports no memory limit and train.memory_budget_gib is 0"
        limits.append(int(limit))
    low = min(limits)
    return int(low * (1 - MARGIN)), (f"device limit {low / GIB:.2f} GiB less "
                                     f"{MARGIN:.0%}")


def compiled_peak(step: Any, *args: Any) -> Optional[int]:
    """Predicted peak bytes a device of the jitted ``step`` on ``args`` (compiled, not run)."""
    mem = step.lower(*args).compile().memory_analysis()
    if mem is None:
        return None
    return int(mem.argument_size_in_bytes + mem.output_size_in_bytes
               - mem.alias_size_in_bytes + mem.temp_size_in_bytes)


def choose(peak_of: Callable[[str], Optional[int]], budget: Optional[int], source: str,
           modes: tuple[str, ...] = SPEED_ORDER) -> Choice:
    """The first mode of ``modes`` whose predicted peak fits ``budget``.

    Args:
      peak_of: mode -> predicted peak bytes (compiles the step with that policy); None when the
        backend has no memory analysis (the mode is then taken).
      budget: bytes (None: take the first mode without compiling).
      source: where the budget comes from (for the log line).
      modes: candidates, fastest first.

    Raises:
      RematError: no mode fits (the message lists each mode's peak and what to change).
    """
    if budget is None:
        return Choice(modes[0], {}, None, source)
    peaks: dict[str, Any] = {}
    for mode in modes:
        try:
            peak = peak_of(mode)
        except Exception as e:  # e.g. host offloading a backend cannot compile
            peaks[mode] = "cannot compile: " + " ".join(str(e).split())[:120]
            continue
        peaks[mode] = peak
        if peak is None or peak <= budget:
            return Choice(mode, peaks, budget, source)
    shown = ", ".join(f"{m} {v / GIB:.2f} GiB" if isinstance(v, int) else f"{m} ({v})"
                      for m, v in peaks.items())
    raise RematError(f"model.remat='auto': no remat policy fits the memory budget of "
                     f"{budget / GIB:.2f} GiB ({source}); predicted peaks: {shown}. Lower "
                     "train.batch_size or train.seq_len, raise train.grad_accum, use more devices "
                     "(mesh.fsdp) or raise train.memory_budget_gib")


def resolve(config: Any, model: Any, make_step: Callable[[Any], Any], state: Any,
            batch: Any) -> tuple[Any, Choice]:
    """(model with the chosen remat, `Choice`) for a run whose ``config.model.remat == "auto"``.

    Args:
      config: the experiment config (``train.memory_budget_gib``, and what `build.make_task`
        reads).
      model: the run's model (any remat).
      make_step: task -> the run's jitted train step.
      state: the placed train state.
      batch: a placed batch of the run's largest shape (values do not matter).

    Raises:
      RematError: no policy fits.
    """
    from qlora_jax.train import build

    budget, source = memory_budget(config.train.memory_budget_gib)

    def peak_of(mode: str) -> Optional[int]:
        step = make_step(build.make_task(config, model.clone(remat=mode)))
        return compiled_peak(step, state, batch)

    choice = choose(peak_of, budget, source)
    return model.clone(remat=choice.mode), choice
