"""Preemption: a SIGTERM or Ctrl-C stops a run after a checkpoint, at a step all processes agree on.

Schedulers of preemptible machines (spot GPUs, TPU VMs, Slurm time limits, Kubernetes) send
SIGTERM some seconds before they kill a job. While `StopSignals` is active (`loop.run` holds it
for the whole run):

- the first SIGTERM or SIGINT (Ctrl-C) only asks the run to stop: the step in flight finishes,
  the loop saves a checkpoint of it (the usual atomic orbax save), closes its logs and raises
  `Preempted`; the launcher prints where it stopped and how to resume and exits with
  `EXIT_CODE`;
- a second SIGINT aborts at once (exit code 130, as a shell reports a Ctrl-C): the last complete
  checkpoint stays valid, since saves are atomic;
- a second SIGTERM changes nothing (job managers may deliver one SIGTERM twice: to the process
  group and through a wrapper).

The signals are read on a small thread fed by ``signal.set_wakeup_fd``, so they take effect while
the main thread is blocked in a long XLA compilation or step, where Python signal handlers would
wait.

`StopPolicy.poll` is called after every step by every process: with several processes it
all-gathers two flags (one int32 each: "this process was signalled" and process 0's "the
checkpoint timer expired"), so all processes stop, and save on time, at the same step even when
only one of them was signalled. JAX's own preemption service (``jax.distributed``'s SIGTERM
notifier and ``reached_preemption_sync_point``) is not used: it knows only SIGTERM, answers
nothing in one process, and its C++ SIGTERM handler swallows the signal until someone asks; the
launcher turns it off.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable, Optional, TextIO

import jax
import numpy as np

#: Exit code of a run stopped by a signal after saving its checkpoint: EX_TEMPFAIL of
#: sysexits.h ("temporary failure; the user is invited to retry"): re-running the same command
#: resumes. Distinct from 0 (finished), 2 (bad input), 3 (NaN loss) and 128 + N (killed by
#: signal N without a checkpoint of the stop step, as a second Ctrl-C gives: 130).
EXIT_CODE = 75

#: Exit code of a second Ctrl-C (128 + SIGINT, what shells report for a process a Ctrl-C ended).
ABORT_EXIT_CODE = 130

#: Test hook: ``STEP`` or ``STEP:SIGNAME`` (default SIGTERM): the process sends itself that
#: signal when step STEP is done (before the step's checkpoint decision), so tests stop a run at
#: a known step through the real signal path.
SIGNAL_ENV = "QLORA_JAX_TEST_SIGNAL_AT_STEP"

_CAUGHT = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """The run stopped early on a signal, after saving a checkpoint of the step it stopped at.

    Attributes:
      step: the last step done (the checkpoint's step, or the start step if none ran).
      total: the run's number of steps.
      signal_name: the signal that asked to stop (``"SIGTERM"``, ``"SIGINT"``).
      checkpoint: the directory of the checkpoint to resume from (None: no checkpoint yet).
    """

    def __init__(self, step: int, total: int, signal_name: str, checkpoint: Optional[str]):
        self.step, self.total = step, total
        self.signal_name, self.checkpoint = signal_name, checkpoint
        where = (f"checkpoint {checkpoint} saved" if checkpoint is not None
                 else "no checkpoint yet (a resumed run starts from step 0)")
        super().__init__(f"stopped by {signal_name} after step {step} of {total}; {where}")


class StopSignals:
    """Context manager that turns SIGTERM / SIGINT into a stop request (see the module doc).

    Outside the main thread (where Python cannot install signal handlers) it does nothing and
    signals keep their usual effect. The previous handlers and wakeup fd are restored on exit.

    Args:
      stream: where the notice of a received signal is printed (default stderr).
    """

    def __init__(self, stream: Optional[TextIO] = None):
        self._stream = stream
        self._event = threading.Event()
        self.signal_name: Optional[str] = None
        self.received_at: Optional[float] = None
        self._previous: dict[int, Any] = {}
        self._old_fd: Optional[int] = None
        self._sockets: Optional[tuple[socket.socket, socket.socket]] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def requested(self) -> bool:
        """Whether a stop was asked for (by a signal or `request`)."""
        return self._event.is_set()

    def request(self, signal_name: str = "request") -> None:
        """Asks the run to stop (what the first signal does)."""
        if not self._event.is_set():
            self.signal_name, self.received_at = signal_name, time.monotonic()
            self._event.set()

    def wait(self, timeout: float) -> bool:
        """Waits until a stop is requested; returns whether it was."""
        return self._event.wait(timeout)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self
        reader, writer = socket.socketpair()
        reader.settimeout(None)
        writer.setblocking(False)
        self._sockets = (reader, writer)
        try:
            self._old_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
            for sig in _CAUGHT:  # CPython's C handler writes the signal number to the wakeup fd
                self._previous[sig] = signal.signal(sig, _ignore)
        except (ValueError, OSError):  # not the main interpreter: leave signals alone
            self._restore()
            return self
        self._thread = threading.Thread(target=self._watch, name="qlora_jax-stop-signals",
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}
        if self._sockets is not None:
            signal.set_wakeup_fd(self._old_fd if self._old_fd is not None else -1)
            reader, writer = self._sockets
            self._sockets = None
            try:
                writer.send(b"\0")  # wakes the watcher, which then exits
            except OSError:
                pass
            if self._thread is not None:
                self._thread.join(timeout=5)
                self._thread = None
            reader.close()
            writer.close()

    def _watch(self) -> None:
        reader = self._sockets[0] if self._sockets is not None else None
        while reader is not None:
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum == 0:  # written by _restore
                    return
                if signum in _CAUGHT:
                    self._on_signal(signum)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        out = self._stream or sys.stderr
        if not self._event.is_set():
            self.request(name)
            print(f"{name} received: stopping after the step in flight and saving a checkpoint"
                  " (a second Ctrl-C aborts at once)", file=out, flush=True)
        elif signum == signal.SIGINT:
            print("second SIGINT: aborting now; the last complete checkpoint stays valid",
                  file=out, flush=True)
            os._exit(ABORT_EXIT_CODE)  # noqa: SLF001 - "at once", also amid a compilation


def _ignore(signum: int, frame: Any) -> None:
    """The Python-level handler: the watcher thread does the work."""


class StopPolicy:
    """Decides, the same on every process, whether to stop and whether a timed save is due.

    Args:
      signals: the run's `StopSignals`.
      every_minutes: save when this many minutes of wall time have passed since the last save
        (process 0's clock decides for all); 0 turns timed saves off.
      clock: seconds (``time.monotonic``; tests pass a fake one).
    """

    def __init__(self, signals: StopSignals, every_minutes: float = 0.0,
                 clock: Callable[[], float] = time.monotonic):
        self.signals, self.every_s = signals, 60.0 * float(every_minutes)
        self._clock = clock
        self._last_save = clock()
        hook = os.environ.get(SIGNAL_ENV, "")
        step, _, name = hook.partition(":")
        self._hook = (int(step), getattr(signal, name or "SIGTERM")) if step else None

    def saved(self) -> None:
        """Restarts the timer of timed saves (call after every checkpoint save)."""
        self._last_save = self._clock()

    def poll(self, step: int) -> tuple[bool, bool]:
        """(stop, timed save due) after ``step``; every process calls it at every step."""
        if self._hook is not None and self._hook[0] == step:
            os.kill(os.getpid(), self._hook[1])
            self.signals.wait(10.0)  # the watcher thread sees it within milliseconds
        due = bool(self.every_s) and self._clock() - self._last_save >= self.every_s
        return agree(self.signals.requested, due)

    @property
    def signal_name(self) -> str:
        """The signal that stopped this process, or ``"another process's signal"``."""
        return self.signals.signal_name or "a signal to another process"


def agree(stop: bool, due: bool) -> tuple[bool, bool]:
    """(any process asks to stop, process 0's due flag); a collective with several processes."""
    if jax.process_count() == 1:
        return stop, due
    from jax.experimental import multihost_utils

    flags = np.asarray(multihost_utils.process_allgather(np.array([stop, due], np.int32)))
    flags = flags.reshape(jax.process_count(), 2)  # [processes, (stop, due)]
    return bool(flags[:, 0].any()), bool(flags[0, 1])
