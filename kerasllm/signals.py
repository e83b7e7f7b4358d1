"""Signals that stop a long command (training, export) as Ctrl-C does: one line, the command's
cleanup run (a training stopped before its first checkpoint leaves nothing, an export leaves no
staging directory), exit 128 + the signal's number.

SIGTERM (a job manager, `timeout`, `kill`) and SIGHUP (a closed terminal or SSH session) raise
`Terminated`; SIGINT raises KeyboardInterrupt as Python's own handler does. Each handler also
records the signal in `received`, and `raise_if_received` raises it again: Python runs a handler
between any two bytecodes, also inside a `__del__` or a garbage-collector callback, where the
exception is printed ("Exception ignored in ...") and dropped. A training whose SIGTERM landed
there had trained on (a CI run waited 120 s), an export whose Ctrl-C did had finished and exited
0. Training checks at every step (training.StopWhenTerminated), export at every stage. A second
SIGTERM or SIGHUP kills at once.

No TensorFlow here (the export's CLI imports this before it).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

from kerasllm.errors import Terminated

# The signal that stopped the command, once its handler ran (None before).
received: int | None = None


def raise_if_received() -> None:
    """Raise the stop a handler raised, in case Python dropped it (see the module docstring)."""
    if received == signal.SIGINT:
        raise KeyboardInterrupt
    if received is not None:
        raise Terminated(received)


def _stop(signum, frame):
    global received
    received = signum
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    for other in (signal.SIGTERM, signal.SIGHUP):  # a second one kills at once
        signal.signal(other, signal.SIG_DFL)
    raise Terminated(signum)


@contextlib.contextmanager
def stops_cleanly(enabled: bool = True) -> Iterator[None]:
    """Within: SIGINT, SIGTERM and SIGHUP stop the main thread's work as described above. A signal
    the process ignores (SIG_IGN inherited: `nohup`, `cmd &` in a script) or handles otherwise stays
    so; off the main thread, or with `enabled` False (a multi-worker training: a worker blocked in a
    collective op runs no Python handler, distribute.py), nothing changes."""
    global received
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL,
                signal.SIGHUP: signal.SIG_DFL}
    installed = [signum for signum, default in defaults.items() if signal.getsignal(signum) == default]
    for signum in installed:
        signal.signal(signum, _stop)
    try:
        yield
    finally:
        for signum in installed:
            signal.signal(signum, defaults[signum])
        received = None


def name(signum: int) -> str:
    """"SIGTERM" for 15."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
