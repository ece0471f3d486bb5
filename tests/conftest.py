"""Shared test settings: one torch thread per process, as every rank of a multi-process test
uses, and Ctrl-C delivered as a terminal delivers it."""
from __future__ import annotations

import os
import signal
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # `import multiprocess` from any working directory


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def ctrl_c_as_in_a_terminal():
    # A suite started in the background (`cmd &` in a script) inherits SIGINT ignored, and
    # the engine then rightly leaves Ctrl-C alone; the Ctrl-C tests, and the processes they
    # start, need it delivered as a terminal would.
    before = signal.getsignal(signal.SIGINT)
    if before is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)
