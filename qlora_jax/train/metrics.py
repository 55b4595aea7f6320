"""Run logging: metrics.jsonl, eval.jsonl, TensorBoard events, and a progress bar or log lines.

``peak_memory_bytes`` is the device's ``memory_stats()["peak_bytes_in_use"]`` where the backend
reports it (GPU, TPU); on CPU, which reports no device statistics, it is the peak resident set
size of the process (``resource.getrusage(RUSAGE_SELF).ru_maxrss``). ``peak_memory_source`` in
each record says which (``"device"`` or ``"host_rss"``).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Any, Mapping, Optional, TextIO

import jax

#: Progress displays: a tqdm bar, plain log lines, or a bar on a terminal and lines otherwise.
PROGRESS_MODES = ("auto", "bar", "lines")


def peak_memory() -> tuple[int, str]:
    """(bytes, source): device peak bytes in use, or the process's peak RSS on CPU."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # backends without statistics raise or return None
        stats = {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device"
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss_kib) * 1024, "host_rss"


def truncate_jsonl(path: str, after_step: int) -> None:
    """Drops records with ``step > after_step`` (those of steps a resumed run repeats)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if int(record.get("step", 0)) <= after_step:
                keep.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(keep)
    os.replace(tmp, path)


class MetricsLogger:
    """Writes each logged step to metrics.jsonl and TensorBoard, and shows progress.

    Args:
      workdir: folder of ``metrics.jsonl`` and the TensorBoard event files.
      total_steps: the run's number of steps (for the bar).
      start_step: first step of this process (resumed runs start later).
      progress: ``"bar"`` (tqdm), ``"lines"`` (plain lines) or ``"auto"`` (a bar on a terminal).
      stream: where progress goes (default stderr).
    """

    def __init__(self, workdir: str, total_steps: int, start_step: int = 0,
                 progress: str = "auto", stream: Optional[TextIO] = None):
        from tensorboardX import SummaryWriter

        self.path = os.path.join(workdir, "metrics.jsonl")
        self.eval_path = os.path.join(workdir, "eval.jsonl")
        truncate_jsonl(self.path, start_step)
        truncate_jsonl(self.eval_path, start_step)
        self._file = open(self.path, "a", encoding="utf-8")
        self._eval_file = open(self.eval_path, "a", encoding="utf-8")
        self._tb = SummaryWriter(workdir, purge_step=start_step if start_step else None)
        self._stream = stream or sys.stderr
        tty = hasattr(self._stream, "isatty") and self._stream.isatty()
        self._bar = None
        if progress == "bar" or (progress == "auto" and tty):
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, file=self._stream,
                             dynamic_ncols=True, desc="train")
        self._last_step = start_step

    def log(self, step: int, metrics: Mapping[str, Any], evaluation: bool = False
            ) -> dict[str, Any]:
        """Writes one record ``{"step": step, **metrics, peak memory}``; returns it.

        Training records go to metrics.jsonl, evaluation records (``evaluation=True``) to
        eval.jsonl, so every line of metrics.jsonl has the same training fields.
        """
        peak, source = peak_memory()
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()},
                  "peak_memory_bytes": peak, "peak_memory_source": source,
                  "time": round(time.time(), 3)}
        out = self._eval_file if evaluation else self._file
        out.write(json.dumps(record) + "\n")
        out.flush()
        for k, v in record.items():
            if k not in ("step", "time") and isinstance(v, (int, float)):
                self._tb.add_scalar(k, v, int(step))
        self._tb.flush()
        if self._bar is not None:
            self._bar.update(int(step) - self._last_step)
            shown = {k: record[k] for k in ("loss", "tokens_per_s", "eval_loss",
                                            "eval_accuracy") if k in record}
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=True)
        else:
            shown = " ".join(f"{k}={_fmt(v)}" for k, v in record.items()
                             if k not in ("step", "time", "peak_memory_source"))
            print(f"step {int(step)}: {shown}", file=self._stream, flush=True)
        self._last_step = int(step)
        return record

    def message(self, text: str) -> None:
        """A line of text that does not break the bar."""
        if self._bar is not None:
            self._bar.write(text, file=self._stream)
        else:
            print(text, file=self._stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._tb.close()
        self._file.close()
        self._eval_file.close()


class NullLogger:
    """The logger of processes other than process 0: writes and prints nothing."""

    def log(self, step: int, metrics: Mapping[str, Any], evaluation: bool = False
            ) -> dict[str, Any]:
        return {"step": int(step), **metrics}

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    return v


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.5g}"
    return str(v)
