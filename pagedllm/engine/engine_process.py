"""What runs in an engine process (a data-parallel replica, or the server's engine core): build
an ``LLMEngine`` on this replica's GPUs, run its drivers' commands (add, abort, reset the prefix
cache, stop), step, and send each driver the progress of its own requests (``progress``: new
tokens, not outputs: the driver decodes and builds those) from a thread of its own (``_Outbox``).
A server with several API-server processes gives each its own pipe here, beside the one of the
process that started it. It ends when that process says so or is gone; a driver that goes away
alone has its requests aborted. An error it cannot survive goes to every driver, then it exits.
"""

import gc
import logging
import multiprocessing.connection
import os
import signal
import threading
import traceback

import torch

from pagedllm.config import EngineConfig
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.engine.progress import ProgressReport, merge_reports, report_finished
from pagedllm.metrics import EngineStats


def run_engine_process(config: EngineConfig, index: int, replicas: int, conns: list, drivers_ends: list,
                       forked: bool) -> None:
    """A replica process: build an engine on this replica's GPUs, then run what its drivers send
    (``conns``: the pipe of the process that started it first, then the other drivers'). It ends
    when that process says so, or is gone (its pipe closes, or, as a driver that forked later
    replicas left them its end, the process that started this one is no longer its parent)."""
    if forked:  # the driver's heap came along: this process's collections need not walk it (nor copy its pages)
        gc.freeze()
    outboxes: list[_Outbox] = []
    for end in drivers_ends:
        end.close()  # so that a pipe closes when its driver dies
    driver = os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C and a stop are the driver's to handle
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if replicas > 1:  # one replica's account of its start-up is enough
        logging.getLogger("pagedllm").setLevel(logging.WARNING)
    try:
        if config.device.startswith("cuda"):
            tp = config.tensor_parallel_size
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            devices = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(devices[index * tp:(index + 1) * tp])
        # a forked child's inherited OpenMP pool is unusable (data_parallel.start_method)
        torch.set_num_threads(1 if forked else max(1, (os.cpu_count() or 1) // replicas))
        engine = LLMEngine(config)
        engine.outputs = ProgressReport(engine.tokenizer)
        gc.collect()  # the start-up heap stays out of the collector's full passes (as in the server's process)
        gc.freeze()
        for conn in conns:
            conn.send(("ready", engine.cache_capacity))
        outboxes = [_Outbox(conn) for conn in conns]
        _serve(engine, outboxes, driver)
    except (EOFError, KeyboardInterrupt):
        pass
    except BaseException:
        message = ("error", traceback.format_exc())
        for send in [outbox.send for outbox in outboxes] or [conn.send for conn in conns]:
            try:
                send(message)
            except OSError:
                pass
        os._exit(1)


class _Outbox:
    """What a replica sends its driver, sent by a thread of its own, so that the engine steps on
    while the driver is busy (a server's HTTP process under load) instead of slowing to its pace.
    Reports that wait meanwhile are merged per request: a busy driver gets fewer, larger messages,
    as vLLM's output collector gives a slow reader."""

    def __init__(self, conn):
        self.conn = conn
        self.sending = threading.Lock()  # the thread's messages and the engine loop's answers, whole
        self.changed = threading.Condition()
        self.reports: dict[str, tuple] = {}  # waiting to go, by request
        self.counts: tuple[int, EngineStats] | None = None  # tokens generated and stats, when there is news
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="pagedllm-outbox", daemon=True)
        self.thread.start()

    def put(self, reports: list[tuple], generated: int, stats: EngineStats) -> None:
        with self.changed:
            for report in reports:
                waiting = self.reports.get(report[0])
                self.reports[report[0]] = report if waiting is None else merge_reports(waiting, report)
            self.counts = (generated, stats)
            self.changed.notify()

    def send(self, message: tuple) -> None:
        with self.sending:
            self.conn.send(message)

    def close(self) -> None:
        """Send what waits, then stop the thread."""
        with self.changed:
            self.closed = True
            self.changed.notify()
        self.thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            with self.changed:
                while self.counts is None and not self.closed:
                    self.changed.wait()
                if self.counts is None:
                    return
                reports, (generated, stats) = list(self.reports.values()), self.counts
                self.reports, self.counts = {}, None
            try:
                self.send(("outputs", reports, generated, stats))
            except (OSError, ValueError):  # the driver is gone: the engine loop sees its pipe close
                return
            except BaseException:  # (a report that cannot be pickled) the replica fails, as if its loop had
                try:
                    self.send(("error", traceback.format_exc()))
                except (OSError, ValueError):
                    pass
                os._exit(1)


def _serve(engine: LLMEngine, drivers: list[_Outbox], driver: int) -> None:
    owners: dict[str, _Outbox] = {}  # request id -> the driver that added it
    while True:
        commanded = False
        while True:  # the commands that came; waiting for one only while there is nothing to do
            idle = not commanded and not engine.has_unfinished_requests()
            ready = multiprocessing.connection.wait([d.conn for d in drivers], 1.0 if idle else 0)
            if not ready:
                if not idle:
                    break
                if os.getppid() != driver:  # the driver is gone
                    engine.shutdown()
                    return
                continue
            for sender in [d for d in drivers if d.conn in ready]:
                try:
                    command = sender.conn.recv()
                except (EOFError, OSError):
                    if sender is drivers[0]:  # the process that started this one
                        raise EOFError from None
                    drivers.remove(sender)  # an API-server process gone: its requests go with it
                    sender.close()
                    theirs = [r for r, owner in owners.items() if owner is sender]
                    engine.abort_request(theirs)
                    for request_id in theirs:
                        del owners[request_id]
                    continue
                commanded = True
                if command[0] == "stop":
                    for outbox in drivers:
                        outbox.close()
                    engine.shutdown()
                    return
                if command[0] == "add":
                    request_id, prompt_token_ids, params, prompt, stream, salt = command[1]
                    engine.add_request(request_id, prompt_token_ids, params, prompt=prompt, stream=stream,
                                       cache_salt=salt)
                    owners[request_id] = sender
                elif command[0] == "abort":  # a list of request ids
                    engine.abort_request(command[1])
                    for request_id in command[1]:
                        owners.pop(request_id, None)
                elif command[0] == "reset_prefix_cache":
                    sender.send(("answer", engine.block_manager.reset_prefix_cache()))
        reports = engine.step() if engine.has_unfinished_requests() else []
        if reports or commanded:  # (after commands alone, for the stats: an abort frees blocks)
            own: dict[_Outbox, list[tuple]] = {outbox: [] for outbox in drivers}
            for report in reports:
                request_id = report[0]
                owner = owners.pop(request_id, None) if report_finished(report) else owners.get(request_id)
                if owner in own:
                    own[owner].append(report)
            stats = engine.stats()
            for outbox, theirs in own.items():  # each driver its own requests, and every driver the stats
                outbox.put(theirs, engine.num_generated_tokens, stats)
