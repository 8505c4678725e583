"""SignalCatcher: handlers that only record, a wait that sees them, handlers restored."""

from __future__ import annotations

import os
import signal
import threading
import time

from engine.signals import SignalCatcher


def test_a_signal_ends_the_wait_and_the_first_one_is_kept() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    with SignalCatcher((signal.SIGUSR1, signal.SIGUSR2)) as caught:
        assert not caught.wait(0.05)
        timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGUSR2))
        timer.start()
        start = time.monotonic()
        assert caught.wait(10)
        assert time.monotonic() - start < 5
        os.kill(os.getpid(), signal.SIGUSR1)
        assert caught.received is signal.SIGUSR2
        timer.join()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_a_storm_of_signals_during_waits_never_hangs() -> None:
    # The handler takes no lock, so signals landing anywhere in wait() are harmless.
    with SignalCatcher((signal.SIGUSR1,)) as caught:
        stop = threading.Event()

        def storm() -> None:
            while not stop.is_set():
                os.kill(os.getpid(), signal.SIGUSR1)
                time.sleep(0.0005)

        thread = threading.Thread(target=storm)
        thread.start()
        try:
            for _ in range(40):
                caught.received = None
                assert caught.wait(5)
        finally:
            stop.set()
            thread.join()
