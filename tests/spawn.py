"""Run a test body in ``world`` spawned processes joined by a gloo process group: free port,
bounded timeouts, every rank's exception reported."""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 150


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, body, args):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        body(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown: a background C++ thread of DDP or FSDP can
    # still be joinable when its destructor runs at exit, which aborts the process
    # ("terminate called without an active exception", seen once in CI) after a passing body.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run(body, world: int, *args) -> None:
    """``body(rank, world, *args)`` on ``world`` ranks (``body``: a module-level function)."""
    context = mp.start_processes(_entry, args=(world, free_port(), body, args), nprocs=world,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"distributed test did not finish in {TIMEOUT_S} s")
