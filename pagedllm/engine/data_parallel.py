"""Engines in processes of their own: N replicas for data parallelism, each on its own GPUs (or
the CPU), behind the engine interface ``LLM`` and ``pagedllm generate`` drive; and, with N = 1,
the server's engine core, apart from the HTTP process (``AsyncLLM``). Requests wait here and go
to whichever replica has room, as replicas free up (not a fixed split: lengths differ); outputs
come back as each replica makes them, without the prompts this side already holds. A replica
that dies fails its requests, with the reason.
"""

import copy
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import sys
import threading
import traceback
import weakref
from collections import deque

import torch

from pagedllm.config import EngineConfig
from pagedllm.engine.block_manager import CacheCapacity
from pagedllm.engine.llm_engine import LLMEngine, eos_token_ids, generation_defaults, load_tokenizer
from pagedllm.engine.outputs import add_delta, copy_output
from pagedllm.engine.request_checks import truncated_prompt, validate_request
from pagedllm.engine.structured_output import GrammarCompiler
from pagedllm.metrics import EngineStats
from pagedllm.outputs import CompletionOutput, RequestOutput
from pagedllm.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger("pagedllm")
STARTUP_TIMEOUT_S = 900


class DataParallelEngine:
    """``config.data_parallel_size`` replicas of ``LLMEngine``; replica i runs on GPUs
    [i * tp, (i + 1) * tp) with tp = ``config.tensor_parallel_size``."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.tokenizer = load_tokenizer(config)
        self.eos_token_ids = eos_token_ids(config, self.tokenizer)
        self.default_sampling_fields = generation_defaults(config)
        self.grammars = GrammarCompiler(self.tokenizer, config.hf_config.vocab_size, self.eos_token_ids)
        self.num_generated_tokens = 0
        ctx = mp.get_context(start_method())
        self.replicas = [_Replica(ctx, config, i) for i in range(config.data_parallel_size)]
        self._finalizer = weakref.finalize(self, _stop_all, list(self.replicas))
        try:
            self.cache_capacity = min((replica.wait_ready() for replica in self.replicas), key=lambda c: c.pools)
        except BaseException:
            self.shutdown()
            raise
        # Each replica gets more than a batch's worth, so that its next batch is waiting when one ends.
        self.capacity = 2 * config.max_num_seqs
        self.waiting: deque[tuple] = deque()  # add_request's arguments, not yet given to a replica
        self.placed: dict[str, _Replica] = {}  # request id -> the replica running it
        self.prompts: dict[str, tuple[str | None, list[int]]] = {}  # request id -> its prompt, for its outputs
        logger.info("data parallelism: %d replicas of %d GPU(s) each", len(self.replicas),
                    config.tensor_parallel_size)

    def get_tokenizer(self):
        return self.tokenizer

    def validate_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        validate_request(self.config, self.tokenizer, self.cache_capacity, self.grammars, prompt_token_ids, params)
        try:  # it travels to a replica's process
            pickle.dumps(params)
        except Exception as err:
            raise ValueError(f"SamplingParams.logits_processors={params.logits_processors!r} is invalid: the engine "
                             f"runs in another process, so they must be picklable (module-level functions or "
                             f"objects, not lambdas or closures): {err}") from None

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None, stream: bool = False) -> None:
        self.validate_request(prompt_token_ids, params)
        self.waiting.append((request_id, prompt_token_ids, params, prompt, stream))
        self.prompts[request_id] = (prompt, truncated_prompt(prompt_token_ids, params, self.config.max_model_len))

    def abort_request(self, request_id: str) -> None:
        self.waiting = deque(r for r in self.waiting if r[0] != request_id)
        self.prompts.pop(request_id, None)
        replica = self.placed.pop(request_id, None)
        if replica is not None:
            replica.load -= 1
            if replica.alive:
                replica.send(("abort", request_id))

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.placed)

    @property
    def alive(self) -> bool:
        return any(r.alive for r in self.replicas)

    def step(self, wake: int | None = None) -> list[RequestOutput]:
        """Give waiting requests to replicas with room, then return the outputs that came back,
        waiting for the first if any request is out. With ``wake`` (a file descriptor: readable
        when the caller has new commands for the replicas), wait for a message of any kind, or a
        replica's death, or ``wake``, even with no request out: the replicas' stats stay fresh."""
        self._place_waiting()
        if self.waiting and not self.placed:
            raise RuntimeError("no data-parallel replica took the waiting requests")  # would spin otherwise
        live = [r for r in self.replicas if r.alive]
        outputs = []
        if self.placed or wake is not None:
            ready = mp.connection.wait([r.conn for r in live] + [r.process.sentinel for r in live] +
                                       ([wake] if wake is not None else []))
            for replica in live:
                if replica.conn in ready or replica.process.sentinel in ready:
                    outputs += self._receive(replica)
        for output in outputs:  # the replicas send no prompts back: this side has them
            output.prompt, output.prompt_token_ids = self.prompts.get(output.request_id, (None, []))
            if output.finished:
                self.prompts.pop(output.request_id, None)
        return outputs

    def reset_prefix_cache(self) -> bool:
        """Each replica forgets its cached prefixes; False, and nothing forgotten, while requests run."""
        if self.has_unfinished_requests():
            return False
        return all([r.call(("reset_prefix_cache",)) for r in self.replicas if r.alive])

    def stats(self) -> EngineStats:
        """The replicas' stats, summed, as they last reported them."""
        totals = [r.stats for r in self.replicas]
        return EngineStats(*(sum(getattr(s, f) for s in totals) for f in EngineStats.__dataclass_fields__))

    def shutdown(self) -> None:
        self._finalizer()

    def _place_waiting(self) -> None:
        """Each waiting request goes to the least-loaded live replica while it has room, so that a
        run of fewer requests than the capacity is still shared by every replica."""
        live = [r for r in self.replicas if r.alive]
        while self.waiting and live:
            replica = min(live, key=lambda r: r.load)
            if replica.load >= self.capacity:
                break
            request = self.waiting.popleft()
            replica.send(("add", request))
            replica.load += 1
            self.placed[request[0]] = replica
        if self.waiting and not any(r.alive for r in self.replicas):
            raise RuntimeError("every data-parallel replica has died: create a new LLM")

    def _receive(self, replica: "_Replica") -> list[RequestOutput]:
        """Every message the replica has sent since the last look: outputs, or how it died."""
        outputs = []
        while True:
            try:
                message = replica.conn.recv() if replica.conn.poll() else None
            except (EOFError, OSError):
                message = None
            if message is None:
                if replica.process.is_alive():
                    return outputs
                return outputs + self._lost(replica, f"died with exit code {replica.process.exitcode}")
            if message[0] == "error":
                return outputs + self._lost(replica, f"failed:\n{message[1]}")
            _, new, generated, replica.stats = message
            self.num_generated_tokens += generated - replica.generated
            replica.generated = generated
            for output in new:
                if output.finished and self.placed.pop(output.request_id, None) is replica:
                    replica.load -= 1
            outputs += new

    def _lost(self, replica: "_Replica", why: str) -> list[RequestOutput]:
        """A replica that died fails the requests it held (never silently); the others go on."""
        replica.alive, replica.load = False, 0
        name = f"data-parallel replica {replica.index}" if len(self.replicas) > 1 else "the engine process"
        message = f"{name} {why}"
        logger.error(message)
        failed = [request_id for request_id, r in self.placed.items() if r is replica]
        for request_id in failed:
            del self.placed[request_id]
        return [RequestOutput(request_id, None, [], [CompletionOutput(0, "", [], "error")], True, error=message)
                for request_id in failed]


class _Replica:
    """One replica's process and pipe, and what the driver knows of it."""

    def __init__(self, ctx, config: EngineConfig, index: int):
        self.index, self.alive, self.load, self.generated, self.stats = index, True, 0, 0, EngineStats()
        self.conn, theirs = ctx.Pipe()
        self.process = ctx.Process(target=_replica_main,
                                   args=(_replica_config(config), index, config.data_parallel_size, theirs,
                                         self.conn, ctx.get_start_method() == "fork"),
                                   name=f"pagedllm-dp{index}")  # not a daemon: a replica may start TP workers
        self.process.start()
        theirs.close()

    def wait_ready(self) -> CacheCapacity:
        """What the replica's KV cache can give a request, once its engine is built."""
        ready = mp.connection.wait([self.conn, self.process.sentinel], timeout=STARTUP_TIMEOUT_S)
        message = self.conn.recv() if self.conn in ready and self.conn.poll() else None
        if message is None or message[0] != "ready":
            detail = message[1] if message and message[0] == "error" else (
                f"exit code {self.process.exitcode}; a spawned process imports the main script again, so it needs "
                "an `if __name__ == \"__main__\":` guard (the error is above)")
            raise RuntimeError(f"engine process {self.index} did not start: {detail}")
        return message[1]

    def send(self, message: tuple) -> None:
        try:
            self.conn.send(message)
        except (OSError, ValueError) as err:  # a dead replica's pipe; its requests fail when it is noticed
            logger.warning("cannot reach data-parallel replica %d: %s", self.index, err)

    def call(self, message: tuple):
        """Something an idle replica answers (before the answer it may still send its stats)."""
        self.send(message)
        while (answer := self.conn.recv())[0] == "outputs":
            self.stats = answer[3]
        return answer[1] if answer[0] == "answer" else None


def start_method() -> str:
    """Fork where it is safe (fast, and scripts need no main guard, as with vLLM): on Linux, while
    this process has not initialised CUDA (a forked child could not use it). A forked child runs
    its CPU work on one thread: once this process has run torch's OpenMP threads, a child's first
    parallel op on more threads would wait for them forever."""
    return "fork" if sys.platform == "linux" and not torch.cuda.is_initialized() else "spawn"


def _replica_config(config: EngineConfig) -> EngineConfig:
    """The config one replica builds its engine from (already checked; its GPUs are chosen in the
    replica's process)."""
    replica = copy.copy(config)
    replica.data_parallel_size = 1
    return replica


def _replica_main(config: EngineConfig, index: int, replicas: int, conn, drivers_end, forked: bool) -> None:
    """A replica process: build an engine on this replica's GPUs, then run what the driver sends.
    It ends when the driver says so, or is gone (its pipe closes, or, as a driver that forked
    later replicas left them its end, the process that started this one is no longer its parent)."""
    import signal

    outbox = None
    drivers_end.close()  # so that the pipe closes when the driver dies
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
        # a forked child's inherited OpenMP pool is unusable (start_method)
        torch.set_num_threads(1 if forked else max(1, (os.cpu_count() or 1) // replicas))
        engine = LLMEngine(config)
        conn.send(("ready", engine.cache_capacity))
        outbox = _Outbox(conn)
        _serve(engine, conn, outbox, driver)
    except (EOFError, KeyboardInterrupt):
        pass
    except BaseException:
        try:
            (outbox.send if outbox is not None else conn.send)(("error", traceback.format_exc()))
        except OSError:
            pass
        os._exit(1)


class _Outbox:
    """What a replica sends its driver, sent by a thread of its own, so that the engine steps on
    while the driver is busy (a server's HTTP process under load) instead of slowing to its pace.
    Outputs that wait meanwhile are merged per request (deltas added up, other kinds replaced by
    the newest): a busy driver gets fewer, larger messages, as vLLM's output collector gives a
    slow reader."""

    def __init__(self, conn):
        self.conn = conn
        self.sending = threading.Lock()  # the thread's messages and the engine loop's answers, whole
        self.changed = threading.Condition()
        self.outputs: dict[str, RequestOutput] = {}  # waiting to go, by request
        self.copied: set[str] = set()  # waiting outputs that are this side's copies (merged into)
        self.deltas: set[str] = set()  # the requests whose outputs are deltas
        self.counts: tuple[int, EngineStats] | None = None  # tokens generated and stats, when there is news
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="pagedllm-outbox", daemon=True)
        self.thread.start()

    def track(self, request_id: str, params: SamplingParams, stream: bool) -> None:
        if params.output_kind == RequestOutputKind.DELTA and stream:
            self.deltas.add(request_id)

    def untrack(self, request_id: str) -> None:
        self.deltas.discard(request_id)

    def put(self, outputs: list[RequestOutput], generated: int, stats: EngineStats) -> None:
        with self.changed:
            for output in outputs:
                request_id = output.request_id
                waiting = self.outputs.get(request_id)
                if waiting is not None and request_id in self.deltas:
                    if request_id not in self.copied:  # the engine's own output is not changed
                        waiting = copy_output(waiting)
                        self.copied.add(request_id)
                    output = add_delta(waiting, output)
                self.outputs[request_id] = output
                if output.finished:
                    self.deltas.discard(request_id)
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
                outputs, (generated, stats) = list(self.outputs.values()), self.counts
                self.outputs, self.counts = {}, None
                self.copied.clear()
            try:
                self.send(("outputs", outputs, generated, stats))
            except (OSError, ValueError):  # the driver is gone: the engine loop sees its pipe close
                return
            except BaseException:  # (an output that cannot be pickled) the replica fails, as if its loop had
                try:
                    self.send(("error", traceback.format_exc()))
                except (OSError, ValueError):
                    pass
                os._exit(1)


def _serve(engine: LLMEngine, conn, outbox: _Outbox, driver: int) -> None:
    while True:
        commanded = False
        while True:  # the commands that came; waiting for one only while there is nothing to do
            idle = not commanded and not engine.has_unfinished_requests()
            if not conn.poll(1.0 if idle else 0):
                if not idle:
                    break
                if os.getppid() != driver:  # the driver is gone
                    engine.shutdown()
                    return
                continue
            command = conn.recv()
            commanded = True
            if command[0] == "stop":
                outbox.close()
                engine.shutdown()
                return
            if command[0] == "add":
                request_id, prompt_token_ids, params, prompt, stream = command[1]
                engine.add_request(request_id, prompt_token_ids, params, prompt=prompt, stream=stream)
                outbox.track(request_id, params, stream)
            elif command[0] == "abort":
                engine.abort_request(command[1])
                outbox.untrack(command[1])
            elif command[0] == "reset_prefix_cache":
                outbox.send(("answer", engine.block_manager.reset_prefix_cache()))
        outputs = engine.step() if engine.has_unfinished_requests() else []
        for output in outputs:  # the driver has the prompts: not sent back at every token
            output.prompt, output.prompt_token_ids = None, []
        if outputs or commanded:  # (after commands alone, for the stats: an abort frees blocks)
            outbox.put(outputs, engine.num_generated_tokens, engine.stats())


def _stop_all(replicas: list[_Replica]) -> None:
    for replica in replicas:
        if replica.alive and replica.process.is_alive():
            replica.send(("stop",))
    for replica in replicas:
        replica.process.join(timeout=30)
        if replica.process.is_alive():
            replica.process.kill()
            replica.process.join()
        replica.conn.close()
