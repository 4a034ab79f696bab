"""Run test bodies on ``world`` spawned ranks joined by a gloo process group, every rank's
exception reported.

The ranks of a world size are spawned once and shared by every test that asks for that size:
starting them (processes that import torch, then join the group) took 3-5 s for 2 ranks and
7-9 s for 4 on a 2-core machine, most of each distributed test's time. Between bodies the ranks clear the
library's cache, as tests/conftest.py does between tests; they keep the environment and
modules of the test that spawned them, so a body sets up what it needs itself. A body that fails
on any rank fails its test; the ranks are then stopped (one may be left inside a collective) and
the next test spawns fresh ones.
"""

from __future__ import annotations

import atexit
import datetime
import multiprocessing.connection
import os
import socket
import sys
import time
import traceback

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

# Only a hang ends a body early. The longest body, the 4-rank interpreted norms of
# tests/test_distributed.py, took 24 s on a loaded 2-core machine; the guard (on the test's
# wait and on every collective) is an hour: over 100 times that, and still under CI's
# 90-minute limit, so that a hang is reported as one.
HANG_GUARD_S = 60 * 60
# Once one rank has failed, how long the others get to report before they are stopped. Only
# the report's completeness depends on it, never a verdict: ranks that fail the same check fail
# within milliseconds, and a rank waiting on the failed one in a collective errors as soon as
# that rank exits.
REPORT_GRACE_S = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(body, world: int, *args) -> None:
    """``body(rank, world, *args)`` on the ``world`` shared ranks (``body``: a module-level
    function, which the ranks import by name); fails the test with every failing rank's
    traceback."""
    if world not in _ranks:
        _ranks[world] = _Ranks(world)
    reports = _ranks[world].run(body, args)
    if any(report is not None for report in reports.values()) or len(reports) < world:
        _ranks.pop(world).stop()
        pytest.fail(_failure_message(body, args, world, reports), pytrace=False)


def _failure_message(body, args, world, reports) -> str:
    failed = sorted(rank for rank, report in reports.items() if report is not None)
    running = sorted(set(range(world)) - set(reports))
    call = f"{body.__module__}.{body.__qualname__}{tuple(args)!r} on {world} ranks"
    if not failed:
        return f"{call}: rank(s) {running} still running after the {HANG_GUARD_S} s hang guard"
    lines = [f"{call} failed on rank(s) {failed}"
             + (f"; rank(s) {running} had not finished and were stopped" if running else "")]
    for rank in failed:
        lines += [f"--- rank {rank} ---", reports[rank].rstrip()]
    return "\n".join(lines)


_ranks: dict[int, _Ranks] = {}  # world size -> its ranks, kept for the session


class _Ranks:
    """``world`` processes joined in one gloo group, each running the bodies it is sent."""

    def __init__(self, world: int):
        context = mp.get_context("spawn")
        port = free_port()
        self.world = world
        self.idle = True  # False while a body runs (then closing means stopping)
        self.connections, self.processes = [], []
        for rank in range(world):
            ours, theirs = context.Pipe()
            process = context.Process(target=_serve, args=(rank, world, port, theirs),
                                      name=f"spawn-rank-{rank}-of-{world}")
            process.start()
            theirs.close()
            self.connections.append(ours)
            self.processes.append(process)

    def run(self, body, args) -> dict[int, str | None]:
        """Each rank's report: None if the body passed there, else its traceback. A rank
        missing from the result was still running when the wait ended: at the hang guard, or
        REPORT_GRACE_S after another rank failed."""
        self.idle = False
        for connection in self.connections:
            connection.send((body, args))
        reports: dict[int, str | None] = {}
        end = time.monotonic() + HANG_GUARD_S
        while len(reports) < self.world and time.monotonic() < end:
            waiting = [rank for rank in range(self.world) if rank not in reports]
            multiprocessing.connection.wait(
                [self.connections[r] for r in waiting]
                + [self.processes[r].sentinel for r in waiting],
                timeout=end - time.monotonic())
            for rank in waiting:
                if self.connections[rank].poll() or not self.processes[rank].is_alive():
                    reports[rank] = self._receive(rank)
                    if reports[rank] is not None:
                        end = min(end, time.monotonic() + REPORT_GRACE_S)
        self.idle = len(reports) == self.world
        return reports

    def _receive(self, rank: int) -> str | None:
        try:
            return self.connections[rank].recv()
        except EOFError:
            self.processes[rank].join()
            return (f"rank {rank} exited with code {self.processes[rank].exitcode} before "
                    f"reporting (its stderr is in the captured output)")

    def stop(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.kill()
            process.join()
        for connection in self.connections:
            connection.close()

    def close(self) -> None:
        """Let idle ranks leave the group and exit (busy ones are stopped: the session is
        ending, interrupted in a body); stop those that do not."""
        if not self.idle:
            self.stop()
            return
        for connection in self.connections:
            try:
                connection.send(None)
            except OSError:
                pass
        for process in self.processes:
            process.join(REPORT_GRACE_S)
        self.stop()


@atexit.register
def _close_all() -> None:
    while _ranks:
        _ranks.popitem()[1].close()


def _serve(rank, world, port, connection):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world,
                            timeout=datetime.timedelta(seconds=HANG_GUARD_S))
    failed = False
    while not failed:
        try:
            task = connection.recv()
        except EOFError:  # the test process has gone
            break
        if task is None:
            break
        report = _run_body(rank, world, *task)
        connection.send(report)
        failed = report is not None
    if not failed:  # a failed rank leaves at once: peers waiting on it in a collective error
        dist.destroy_process_group()
    # Leave without the interpreter's teardown: a background C++ thread of DDP or FSDP can
    # still be joinable when its destructor runs at exit, which aborts the process
    # ("terminate called without an active exception", seen once in CI) after a passing body.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if failed else 0)


def _run_body(rank, world, body, args) -> str | None:
    from tritonclip import _core

    _core.clear_cache()  # as tests/conftest.py does before each test
    try:
        body(rank, world, *args)
        dist.barrier()  # every rank done before the next body's collectives
    except BaseException:  # noqa: BLE001 - reported to the test process
        return traceback.format_exc()
    return None
