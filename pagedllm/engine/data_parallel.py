"""Engines in processes of their own: N replicas for data parallelism, each on its own GPUs (or
the CPU), behind the engine interface ``LLM`` and ``pagedllm generate`` drive; and, with N = 1,
the server's engine core, apart from the HTTP process (``AsyncLLM``). Requests wait here and go
to whichever replica has room, as replicas free up (not a fixed split: lengths differ); each
replica reports its requests' new tokens as it makes them, and their text and outputs are made
here (``progress``). A replica that dies fails its requests, with the reason.
"""

import copy
import logging
import multiprocessing as mp
import multiprocessing.connection
import pickle
import sys
import weakref
from collections import OrderedDict
from collections.abc import Iterable

import torch

from pagedllm.config import EngineConfig
from pagedllm.engine.block_manager import CacheCapacity
from pagedllm.engine.engine_process import run_engine_process
from pagedllm.engine.llm_engine import eos_token_ids, generation_defaults, load_tokenizer
from pagedllm.engine.progress import RequestCopies, report_finished
from pagedllm.engine.request_checks import truncated_prompt, validate_request
from pagedllm.engine.structured_output import GrammarCompiler
from pagedllm.metrics import EngineStats
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams

logger = logging.getLogger("pagedllm")
STARTUP_TIMEOUT_S = 900


class DataParallelEngine:
    """``config.data_parallel_size`` replicas of ``LLMEngine``; replica i runs on GPUs
    [i * tp, (i + 1) * tp) with tp = ``config.tensor_parallel_size``."""

    def __init__(self, config: EngineConfig, connections: list | None = None):
        """``connections``: drive replicas another process started (``start_replicas``), through
        these pipes, one per replica, instead of starting them (an API-server process)."""
        self.config = config
        self.tokenizer = load_tokenizer(config)
        self.eos_token_ids = eos_token_ids(config, self.tokenizer)
        self.default_sampling_fields = generation_defaults(config)
        self.grammars = GrammarCompiler(self.tokenizer, config.hf_config.vocab_size, self.eos_token_ids)
        self.num_generated_tokens = 0
        self.replicas = ([_Replica(i, conn) for i, conn in enumerate(connections)] if connections is not None
                         else start_replicas(config)[0])
        self._finalizer = weakref.finalize(self, stop_replicas, list(self.replicas))
        try:
            self.cache_capacity = min((replica.wait_ready() for replica in self.replicas), key=lambda c: c.pools)
        except BaseException:
            self.shutdown()
            raise
        # Each replica gets more than a batch's worth, so that its next batch is waiting when one ends.
        self.capacity = 2 * config.max_num_seqs
        # add_request's arguments by request id, not yet given to a replica (in order; an abort takes one out at once)
        self.waiting: OrderedDict[str, tuple] = OrderedDict()
        self.placed: dict[str, _Replica] = {}  # request id -> the replica running it
        self.copies = RequestCopies(self.tokenizer)  # the requests out, whose outputs are built here
        if len(self.replicas) > 1:  # (one replica is just the engine in a process of its own)
            logger.info("data parallelism: %d replicas of %d GPU(s) each", len(self.replicas),
                        config.tensor_parallel_size)

    def get_tokenizer(self):
        return self.tokenizer

    def validate_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        validate_request(self.config, self.tokenizer, self.cache_capacity, self.grammars, self.eos_token_ids,
                         prompt_token_ids, params)
        if not params.logits_processors:  # (every other field is plain data)
            return
        try:  # it travels to a replica's process
            pickle.dumps(params)
        except Exception as err:
            raise ValueError(f"SamplingParams.logits_processors={params.logits_processors!r} is invalid: the engine "
                             f"runs in another process, so they must be picklable (module-level functions or "
                             f"objects, not lambdas or closures): {err}") from None

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None, stream: bool = False, cache_salt: str | None = None) -> None:
        if request_id in self.waiting or request_id in self.placed:
            raise ValueError(f"request id {request_id!r} is already running: give each request an id of its own")
        self.validate_request(prompt_token_ids, params)
        self.waiting[request_id] = (request_id, prompt_token_ids, params, prompt, stream, cache_salt)
        self.copies.add(request_id, truncated_prompt(prompt_token_ids, params, self.config.max_model_len), params,
                        prompt, stream)

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        """End a request, or many: each replica is told of its own in one message."""
        by_replica: dict[_Replica, list[str]] = {}
        for one in [request_id] if isinstance(request_id, str) else request_id:
            self.waiting.pop(one, None)
            self.copies.drop(one)
            replica = self.placed.pop(one, None)
            if replica is not None:
                replica.load -= 1
                by_replica.setdefault(replica, []).append(one)
        for replica, ids in by_replica.items():
            if replica.alive:
                replica.send(("abort", ids))

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.placed)

    @property
    def alive(self) -> bool:
        return any(r.alive for r in self.replicas)

    def step(self, wake: int | None = None) -> list[RequestOutput]:
        """``step_reports``, each report built into its request's output here."""
        outputs = []
        for item in self.step_reports(wake):
            output = self.output(item)
            if output is None:  # aborted here meanwhile
                continue
            if isinstance(item, tuple) and output.finished and not report_finished(item):  # failed here (its text)
                self.abort_request(output.request_id)  # its replica stops it
            outputs.append(output)
        return outputs

    def step_reports(self, wake: int | None = None) -> list[tuple | RequestOutput]:
        """Give waiting requests to replicas with room, then return what came back: the requests'
        reports (``progress``; ``output`` builds them, several of one request merged first for a
        reader that fell behind) and the failed outputs of a replica that died, waiting for the
        first if any request is out. With ``wake`` (a file descriptor: readable when the caller
        has new commands for the replicas), wait for a message of any kind, or a replica's death,
        or ``wake``, even with no request out: the replicas' stats stay fresh."""
        self._place_waiting()
        if self.waiting and not self.placed:
            raise RuntimeError("no data-parallel replica took the waiting requests")  # would spin otherwise
        live = [r for r in self.replicas if r.alive]
        items = []
        if self.placed or wake is not None:
            ready = mp.connection.wait([r.conn for r in live] + [r.process.sentinel for r in live if r.process] +
                                       ([wake] if wake is not None else []))
            for replica in live:
                if replica.conn in ready or (replica.process and replica.process.sentinel in ready):
                    items += self._receive(replica)
        return items

    def output(self, item: tuple | RequestOutput) -> RequestOutput | None:
        """A report's output (None if the request was dropped here meanwhile), or a failed output as
        it came. Safe beside the thread that steps (an ``AsyncLLM`` reader builds its own). A text
        that fails here ends the request with its error while its replica still runs it: the caller
        aborts it there."""
        return item if isinstance(item, RequestOutput) else self.copies.output(item)

    def reset_prefix_cache(self) -> bool:
        """Each replica forgets its cached prefixes; False, and nothing forgotten, while requests run."""
        if self.has_unfinished_requests():
            return False
        return all([r.call(("reset_prefix_cache",)) for r in self.replicas if r.alive])

    def stats(self) -> EngineStats:
        """The replicas' stats, summed, as they last reported them. With no request out, what they
        sent since is read first (reports of requests aborted here, and their stats after the
        aborts): no step would read it, and an abort's requests seemed to run on."""
        if not self.placed:
            for replica in self.replicas:
                if replica.alive:
                    self._receive(replica)
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
            request = self.waiting.popitem(last=False)[1]
            replica.send(("add", request))
            replica.load += 1
            self.placed[request[0]] = replica
        if self.waiting and not any(r.alive for r in self.replicas):
            raise RuntimeError("every data-parallel replica has died: create a new LLM")

    def _receive(self, replica: "_Replica") -> list[tuple | RequestOutput]:
        """Every message the replica has sent since the last look: reports, or how it died."""
        items = []
        while True:
            try:
                message = replica.conn.recv() if replica.conn.poll() else None
            except (EOFError, OSError):
                if replica.process is None:  # started by another process: its pipe closing is all this one sees
                    return items + self._lost(replica, "exited")
                message = None
            if message is None:
                if replica.process is None or replica.process.is_alive():
                    return items
                return items + self._lost(replica, f"died with exit code {replica.process.exitcode}")
            if message[0] == "error":
                return items + self._lost(replica, f"failed:\n{message[1]}")
            _, reports, generated, replica.stats = message
            self.num_generated_tokens += generated - replica.generated
            replica.generated = generated
            for report in reports:
                if report_finished(report) and self.placed.get(report[0]) is replica:  # finished there
                    del self.placed[report[0]]
                    replica.load -= 1
            items += reports

    def _lost(self, replica: "_Replica", why: str) -> list[RequestOutput]:
        """A replica that died fails the requests it held (never silently); the others go on."""
        replica.alive, replica.load = False, 0
        name = f"data-parallel replica {replica.index}" if len(self.replicas) > 1 else "the engine process"
        message = f"{name} {why}"
        logger.error(message)
        failed = [request_id for request_id, r in self.placed.items() if r is replica]
        for request_id in failed:
            del self.placed[request_id]
        outputs = [self.copies.failed(request_id, message) for request_id in failed]
        return [output for output in outputs if output is not None]


class _Replica:
    """One replica's pipe (and process, if this one started it), and what the driver knows of it."""

    def __init__(self, index: int, conn, process=None):
        self.index, self.conn, self.process = index, conn, process
        self.alive, self.load, self.generated, self.stats = True, 0, 0, EngineStats()
        self.capacity: CacheCapacity | None = None  # what its KV cache can give a request, once it said

    def wait_ready(self) -> CacheCapacity:
        """What the replica's KV cache can give a request, once its engine is built."""
        if self.capacity is not None:
            return self.capacity
        ready = mp.connection.wait([self.conn] + ([self.process.sentinel] if self.process else []),
                                   timeout=STARTUP_TIMEOUT_S)
        try:
            message = self.conn.recv() if self.conn in ready and self.conn.poll() else None
        except EOFError:
            message = None
        if message is None or message[0] != "ready":
            if message and message[0] == "error":
                detail = message[1]
            elif self.process is None:  # started by another process, which says why
                detail = "it exited (the error is above)"
            else:
                detail = (f"exit code {self.process.exitcode}; a spawned process imports the main script again, so "
                          "it needs an `if __name__ == \"__main__\":` guard (the error is above)")
            raise RuntimeError(f"engine process {self.index} did not start: {detail}")
        self.capacity = message[1]
        return self.capacity

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


def start_replicas(config: EngineConfig, other_drivers: int = 0) -> tuple[list[_Replica], list[list]]:
    """Start the replicas' processes, each with a pipe for this process and one for each of
    ``other_drivers`` more (a server's API-server processes), and wait until their engines are
    built. Returns this process's replicas and, per other driver, its pipes (one per replica)."""
    ctx = mp.get_context(start_method())
    replicas, others = [], [[] for _ in range(other_drivers)]
    for index in range(config.data_parallel_size):
        pipes = [ctx.Pipe() for _ in range(1 + other_drivers)]
        process = ctx.Process(target=run_engine_process,
                              args=(_replica_config(config), index, config.data_parallel_size,
                                    [theirs for _, theirs in pipes], [ours for ours, _ in pipes],
                                    ctx.get_start_method() == "fork"),
                              name=f"pagedllm-dp{index}")  # not a daemon: a replica may start TP workers
        process.start()
        for _, theirs in pipes:
            theirs.close()
        replicas.append(_Replica(index, pipes[0][0], process))
        for driver, (ours, _) in zip(others, pipes[1:], strict=True):
            driver.append(ours)
    try:
        for replica in replicas:
            replica.wait_ready()
    except BaseException:
        stop_replicas(replicas)
        raise
    return replicas, others


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


def stop_replicas(replicas: list[_Replica]) -> None:
    """Stop the replicas this process started; of others', only close the pipes (their requests
    are aborted; the process that started them stops them)."""
    for replica in replicas:
        if replica.process is not None and replica.alive and replica.process.is_alive():
            replica.send(("stop",))
    for replica in replicas:
        if replica.process is not None:
            replica.process.join(timeout=30)
            if replica.process.is_alive():
                replica.process.kill()
                replica.process.join()
        replica.conn.close()
