"""Tensor-parallel workers: ranks 1..N-1, each a process of its own with its own ModelRunner.

The driver process is rank 0: it schedules, and before each step sends the step's batch (token
ids, positions' blocks) to every worker through a pipe; then all ranks run the same forward
pass, meeting in the layers' collectives. Only rank 0 samples. A worker that dies or fails makes
the driver's step raise (gloo notices the closed sockets; NCCL is aborted by a monitor thread),
never hang. Workers are forked where that is safe (this process has not initialised CUDA), as
vLLM does, so scripts need no main guard; otherwise spawned.

Stopping: every rank leaves the process group together (NCCL's teardown waits for all ranks),
bounded in time, then aborted; the workers are then reaped, killed if they must be.
"""

import gc
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import signal
import sys
import threading
import traceback
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from pagedllm.distributed import (
    abort_tensor_parallel,
    check_no_group,
    init_tensor_parallel,
    leave_tensor_parallel,
    rank_device,
)
from pagedllm.worker.model_runner import ModelRunner

logger = logging.getLogger("pagedllm")
# How long a collective may wait for a rank that is alive but slow (a first compile, a capture).
COLLECTIVE_TIMEOUT_S = 600
STARTUP_TIMEOUT_S = 600
LEAVE_TIMEOUT_S = 20  # for all ranks to leave the group together before it is aborted
DEAD_LEAVE_TIMEOUT_S = 2  # the same when a rank is known dead


class WorkerFailed(RuntimeError):
    pass


class _ForkUnusable(Exception):
    """A forked worker found CUDA unusable (the parent had initialised it): spawn instead."""


class WorkerGroup:
    """The driver's handle on ranks 1..N-1: starts them, sends them each step, stops them."""

    def __init__(self, config, world_size: int):
        check_no_group()
        self.world_size = world_size
        self.start_method = start_method()
        try:
            self._start(config)
        except _ForkUnusable:  # this process touched CUDA before: a forked child cannot use it
            logger.warning("CUDA was initialised in this process before the LLM was created, so tensor-parallel "
                           "workers are spawned, not forked: the script needs an `if __name__ == \"__main__\":` "
                           "guard")
            self.start_method = "spawn"
            self._start(config)
        threading.Thread(target=self._monitor, name="pagedllm-tp-monitor", daemon=True).start()

    def _start(self, config) -> None:
        ctx = mp.get_context(self.start_method)
        self.procs, self.conns = [], []
        for rank in range(1, self.world_size):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(config, rank, self.world_size, theirs,
                                                          self.start_method == "fork"),
                               name=f"pagedllm-tp{rank}", daemon=True)
            proc.start()
            theirs.close()
            self.procs.append(proc)
            self.conns.append(ours)
        self._stopping = threading.Event()  # set first thing when stopping: the monitor then stands down
        self._finalizer = weakref.finalize(self, _stop, self.procs, self.conns, self._stopping)
        try:
            # The rendezvous store's server thread starts once the workers are forked: a worker forked
            # while it ran could inherit a lock it held, and hang (a full CPU test run once waited the
            # whole collective timeout with rank 3 of 4 inside TCPStore's constructor).
            store = dist.TCPStore("127.0.0.1", 0, self.world_size, is_master=True, wait_for_workers=False)
            for rank in range(1, self.world_size):
                self._expect(rank, "joining")  # a worker that cannot even start fails here, not in a hang
                self.conns[rank - 1].send(("store", store.port))
            init_tensor_parallel(0, self.world_size, rank_device(config.device, 0), store, COLLECTIVE_TIMEOUT_S)
        except BaseException:
            self.shutdown()
            raise
        self._store = store  # the TCPStore server lives in this object: keep it while the group lives
        self.checkpoint_bytes_read: list[int] = []

    def wait_ready(self) -> None:
        """After rank 0's own ModelRunner is built: every worker built its own."""
        self.checkpoint_bytes_read = [self._expect(rank, "ready")[0] for rank in range(1, self.world_size)]

    def run(self, forward: Callable[[Any], Any], batch: Any) -> Any:
        """Send ``batch`` to the workers and run ``forward(batch)`` as rank 0. Ctrl-C waits for the
        step's end, so the ranks never fall out of step; any other failure stops the workers."""
        if not self._finalizer.alive:
            raise WorkerFailed("the tensor-parallel workers were stopped after a failure: create a new LLM")
        try:
            with _sigint_deferred():
                data = pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)
                for conn in self.conns:
                    conn.send_bytes(data)
                return forward(batch)
        except KeyboardInterrupt:
            raise
        except BaseException as err:
            failure = self.failure()
            self.shutdown()
            if failure:
                raise WorkerFailed(failure) from None
            raise WorkerFailed(f"a tensor-parallel step failed on rank 0 ({type(err).__name__}: {err}); "
                               "the workers were stopped: create a new LLM") from err

    def failure(self) -> str | None:
        """What went wrong with a worker, if anything did: its error, or how it died."""
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns, strict=True), 1):
            try:
                if conn.poll():
                    message = conn.recv()
                    if message[0] == "error":
                        return f"tensor-parallel worker rank {rank} failed:\n{message[1]}"
            except (EOFError, OSError):
                pass
            proc.join(timeout=1)  # a killed worker is reaped by now
            if proc.exitcode is not None:
                return (f"tensor-parallel worker rank {rank} (pid {proc.pid}) died with exit code {proc.exitcode}; "
                        "create a new LLM")
        return None

    def shutdown(self) -> None:
        """Stop every worker; within LEAVE_TIMEOUT_S and a few seconds more, whatever state they are in."""
        self._finalizer()

    def _expect(self, rank: int, what: str) -> tuple:
        proc, conn = self.procs[rank - 1], self.conns[rank - 1]
        message = None
        if conn in mp.connection.wait([conn, proc.sentinel], timeout=STARTUP_TIMEOUT_S):
            try:
                message = conn.recv()
            except EOFError:
                pass
        if message is None or message[0] != what:
            if message and message[0] == "fork-unusable":
                raise _ForkUnusable()
            if message and message[0] == "error":
                raise WorkerFailed(f"tensor-parallel worker rank {rank} failed to start:\n{message[1]}")
            proc.join(timeout=5)
            spawned = "Spawned workers import the main script again, so it needs an `if __name__ == " \
                      "\"__main__\":` guard, and cannot be read from stdin" if self.start_method == "spawn" else ""
            raise WorkerFailed(f"tensor-parallel worker rank {rank} did not start (exit code {proc.exitcode}; its "
                               f"error is above). {spawned}")
        return message[1:]

    def _monitor(self) -> None:
        """A worker that dies unasked leaves NCCL collectives waiting forever: abort them."""
        mp.connection.wait([p.sentinel for p in self.procs])
        if not self._stopping.is_set():  # not stopped by us
            logger.error("a tensor-parallel worker died: stopping the step")
            abort_tensor_parallel()


def start_method() -> str:
    """Fork where it is safe, as vLLM does: on Linux, while this process has not initialised CUDA (a
    forked child could not use it, and CUDA's own threads may hold locks the child would wait on
    forever, even for workers on the CPU; a worker that finds CUDA unusable anyway says so, and the
    group is started again, spawned). Otherwise spawn: the script then needs a main guard."""
    if sys.platform != "linux":
        return "spawn"
    if torch.cuda.is_initialized():
        logger.warning("CUDA is already initialised in this process, so tensor-parallel workers are spawned, "
                       "not forked: the script needs an `if __name__ == \"__main__\":` guard")
        return "spawn"
    return "fork"


def _stop(procs: list, conns: list, stopping: threading.Event) -> None:
    """Ask each worker to finish, leave the group with them, then make sure they have ended."""
    stopping.set()
    for conn in conns:
        try:
            conn.send_bytes(b"")
        except OSError:
            pass
    # A dead worker will never leave: wait only briefly for the teardown then (it waited the full
    # time for the dead rank on 2 H100s).
    leave_tensor_parallel(DEAD_LEAVE_TIMEOUT_S if any(p.exitcode is not None for p in procs) else LEAVE_TIMEOUT_S)
    for proc in procs:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join()
    for conn in conns:
        conn.close()


@contextmanager
def _sigint_deferred():
    """Hold Ctrl-C until the block ends (only the main thread receives signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _worker_main(config, rank: int, world_size: int, conn, forked: bool) -> None:
    """A worker process: join the group, build this rank's ModelRunner, run what the driver sends.
    A forked worker runs its CPU work on one thread: torch's OpenMP pool does not survive a fork
    (once the driver has used it, a child's first parallel op on more threads waits forever)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    if forked:  # the driver's heap came along: this process's collections need not walk it (nor copy its pages)
        gc.freeze()
    logging.getLogger("pagedllm").setLevel(logging.WARNING)
    device = rank_device(config.device, rank)
    if device.type == "cuda" and torch.cuda._is_in_bad_fork():
        conn.send(("fork-unusable",))
        return
    torch.set_num_threads(1 if forked else max(1, (os.cpu_count() or 1) // world_size))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        conn.send(("joining",))
        _, store_port = conn.recv()  # ("store", port): the driver's rendezvous store, started after the forks
        store = dist.TCPStore("127.0.0.1", store_port, world_size, is_master=False)
        init_tensor_parallel(rank, world_size, device, store, COLLECTIVE_TIMEOUT_S)
        runner = ModelRunner(config, rank)
        conn.send(("ready", runner.checkpoint_bytes_read))
        while data := conn.recv_bytes():
            runner.run_forward(pickle.loads(data))
        runner.shutdown()  # its graphs first: NCCL cannot tear down a communicator that graphs still use
        leave_tensor_parallel(LEAVE_TIMEOUT_S)  # asked to stop: leave together with the driver
    except EOFError:
        abort_tensor_parallel()  # the driver is gone: no one to leave with
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
        os._exit(1)
