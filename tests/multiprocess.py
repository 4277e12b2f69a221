"""The one multi-process test harness, in the style of TorchRec's ``MultiProcessTestBase``.

``run_multiprocess(fn, world_size=2, **kwargs)`` runs ``fn(rank=r, world_size=w, **kwargs)`` in ``w`` processes that
share a gloo process group (a free TCP port on localhost, deterministic algorithms, one intra-op thread each), and
returns the ranks' return values in rank order. A worker's exception fails the test with that rank's traceback.

Workers start from a forkserver that has imported torch and torchrec once, so each test pays a fork, not the
8 s interpreter start-up of a fresh ``import torchrec``. ``fn`` must be a module-level function of an importable
module (e.g. ``tests.test_x``); its return value travels through ``torch.save``.

Example::

    def _worker(rank: int, world_size: int, scale: float) -> Tensor:
        t = torch.full((2,), float(rank) * scale)
        dist.all_reduce(t)
        return t

    run_multiprocess(_worker, world_size=2, scale=3.0)  # [tensor([3., 3.]), tensor([3., 3.])]
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

# imported once by the forkserver (an ImportError is skipped there and raised again in the worker that needs it)
PRELOAD = ["torch", "torch.distributed.optim", "torch.distributed.checkpoint", "torchrec", "torchrec_sid.modules",
           "torchrec_sid.train.loop", "torchrec_sid.jobs.quantize"]
_CONTEXT: Any = None


def _context() -> Any:
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = mp.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(PRELOAD)
    return _CONTEXT


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(fn: Callable[..., Any], rank: int, world_size: int, port: int, kwargs: dict[str, Any],
            results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        try:
            value = fn(rank=rank, world_size=world_size, **kwargs)
        finally:
            dist.destroy_process_group()
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:  # noqa: BLE001 (reported to the parent, which fails the test)
        results.put((rank, False, traceback.format_exc()))


def start_process(fn: Callable[..., Any], **kwargs: Any) -> Any:
    """Starts ``fn(**kwargs)`` in a process of its own (forked from the forkserver: torch and torchrec already
    imported) and returns the ``multiprocessing.Process`` (``pid``, ``exitcode``, ``join``, ``kill``)."""
    process = _context().Process(target=fn, kwargs=kwargs)
    process.start()
    return process


def run_multiprocess(fn: Callable[..., Any], world_size: int = 2, timeout: float = 120.0, **kwargs: Any) -> list[Any]:
    """Runs ``fn`` on ``world_size`` ranks of one gloo group; returns ``[fn's value on rank r for r in ranks]``."""
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, kwargs, results)) for r in range(world_size)]
    for p in procs:
        p.start()
    values: dict[int, Any] = {}
    failures: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(values) < world_size and not failures:
            try:
                rank, ok, payload = results.get(timeout=0.2)
            except queue.Empty:
                # a rank killed (a crash in native code, out of memory) never reports: fail now, not at the timeout
                dead = [f"rank {r} exited with code {p.exitcode} without a result" for r, p in enumerate(procs)
                        if p.exitcode is not None and r not in values and results.empty()]
                if dead:
                    failures.extend(dead)
                elif time.monotonic() > deadline:
                    failures.append(f"timed out after {timeout:.0f} s; ranks {sorted(values)} returned")
                continue
            if ok:
                values[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                failures.append(f"rank {rank} failed:\n{payload}")  # the others may wait in a collective forever
    finally:
        for p in procs:
            p.join(timeout=5 if failures else max(5.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
    if failures:
        raise AssertionError("\n".join(failures))
    bad = [f"rank {r} exited with code {p.exitcode}" for r, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise AssertionError("; ".join(bad))
    return [values[r] for r in range(world_size)]
