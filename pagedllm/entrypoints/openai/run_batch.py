"""``pagedllm run-batch -i requests.jsonl -o results.jsonl --model MODEL`` (also ``python -m
pagedllm.entrypoints.openai.run_batch``), vLLM's ``run-batch``: a file in OpenAI's Batch API format
run through the server's own routes, in this process, without HTTP.

Input lines: ``{"custom_id": "...", "method": "POST", "url": "/v1/chat/completions", "body": {...}}``
(also ``/v1/completions`` and ``/v1/responses``), each body what the route takes over HTTP.
Output lines, in the input's order: ``{"id", "custom_id", "response": {"status_code", "request_id",
"body"}, "error"}`` with the body the server would have answered; a request that failed has its
status and OpenAI's error JSON there, and the error again in ``error``. Every line's envelope is
checked before the model loads. Results are written and flushed as they complete (once those
before them are), so a crash or Ctrl-C loses none already written, and a rerun with the same
files goes on after them.
"""

import argparse
import asyncio
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import TextIO

from tqdm.auto import tqdm

from pagedllm.entrypoints.server_args import engine_args

logger = logging.getLogger("pagedllm")
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
_UNWRITTEN_PER_SEQ = 8
_URL_TIMEOUT_S = 600
_UPLOAD_TRIES, _UPLOAD_WAIT_S = 3, 5
_ERRORS_SAID = 10


class BadBatch(ValueError):
    """The input, or the output to go on from, cannot be run: said before the model loads."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-i", "--input-file", required=True,
                        help="JSONL file of OpenAI Batch API requests, or an http(s) URL to GET it from")
    parser.add_argument("-o", "--output-file", required=True,
                        help="JSONL file of results (a rerun goes on after the results it holds), or an http(s) URL "
                             "to PUT it to once complete")
    parser.add_argument("--output-tmp-dir", help="with an output URL: the folder for the results until they are "
                                                 "uploaded (default: the system's temporary folder)")
    parser.add_argument("--enable-metrics", action="store_true",
                        help="serve the server's Prometheus metrics at http://URL:PORT/metrics while the batch runs")
    parser.add_argument("--url", help="with --enable-metrics: the address to serve them on (default: --host)")
    parser.add_argument("--response-role", default="assistant", help="vLLM's: the role of chat answers (assistant)")
    parser.add_argument("--enable-force-include-usage", action="store_true",
                        help="accepted for vLLM commands: every result carries its usage here")
    parser.add_argument("--model", required=True, help="model directory or hub id")
    engine_args(parser)


def _is_url(path: str) -> bool:
    return path.startswith(("http://", "https://"))


def setting_error(args: argparse.Namespace) -> str | None:
    """A flag that could never run, or what keeps the job from reading its input or writing its
    results, said before anything loads (a URL's side is tried when the job starts)."""
    from pagedllm.entrypoints.generate import file_error

    if args.response_role != "assistant":
        return f"--response-role: chat answers here are the assistant's, not {args.response_role!r}"
    if args.output_tmp_dir is not None and not os.path.isdir(args.output_tmp_dir):
        return f"--output-tmp-dir: no folder {args.output_tmp_dir!r}"
    return file_error(None if _is_url(args.input_file) else args.input_file,
                      None if _is_url(args.output_file) else args.output_file, ("--input-file", "--output-file"))


def download(url: str) -> str:
    """The file at ``url`` in a temporary file (its path); BadBatch if it cannot be had."""
    with tempfile.NamedTemporaryFile("wb", prefix="pagedllm-batch-input-", suffix=".jsonl", delete=False) as f:
        try:
            with urllib.request.urlopen(url, timeout=_URL_TIMEOUT_S) as response:
                shutil.copyfileobj(response, f)
        except (OSError, ValueError) as err:  # (URLError and HTTPError are OSErrors)
            os.unlink(f.name)
            raise BadBatch(f"--input-file: cannot download {url}: {err}") from None
    return f.name


def local_output(args: argparse.Namespace) -> str:
    """Where the results of an output URL are written until uploaded: a name of the URL's own, so
    that a run stopped before its upload goes on from them."""
    digest = hashlib.sha256(args.output_file.encode()).hexdigest()[:16]
    return os.path.join(args.output_tmp_dir or tempfile.gettempdir(), f"pagedllm-batch-{digest}.jsonl")


def upload(path: str, url: str) -> None:
    """PUT the file to ``url`` (a few tries, as a large upload may time out); OSError if it fails."""
    for attempt in range(1, _UPLOAD_TRIES + 1):
        try:
            with open(path, "rb") as f:
                request = urllib.request.Request(url, data=f, method="PUT", headers={
                    "Content-Length": str(os.path.getsize(path)), "Content-Type": "application/jsonl"})
                with urllib.request.urlopen(request, timeout=_URL_TIMEOUT_S):
                    return  # (a status that is not 2xx raises HTTPError)
        except OSError as err:
            if attempt == _UPLOAD_TRIES:
                raise
            logger.warning("uploading the results to %s failed (%s): trying again in %d s", url, err, _UPLOAD_WAIT_S)
            time.sleep(_UPLOAD_WAIT_S)


def requests_in(path: str) -> Iterator[tuple[int, str, str, dict]]:
    """(line number, custom_id, url, body) of each request line (blank lines skipped)."""
    for number, text in _lines(path):
        yield (number, *_request(number, text))


def _lines(path: str) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        for number, text in enumerate(f, 1):
            if text.strip():
                yield number, text


def _request(number: int, text: bytes) -> tuple[str, str, dict]:
    try:
        line = json.loads(text)
    except (ValueError, RecursionError) as err:  # (not UTF-8, not JSON, nested too deeply)
        raise BadBatch(f"line {number}: not a JSON object ({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(line, dict):
        raise BadBatch(f"line {number}: a request is a JSON object, not {type(line).__name__}")
    custom_id, method, url, body = (line.get(key) for key in ("custom_id", "method", "url", "body"))
    if not isinstance(custom_id, str) or not custom_id:
        raise BadBatch(f"line {number}: custom_id must be a non-empty string")
    if method != "POST":
        raise BadBatch(f"line {number}: method must be \"POST\", not {str(method)[:100]!r}")
    if url not in ROUTES:
        raise BadBatch(f"line {number}: url {str(url)[:100]!r} is not one of {', '.join(ROUTES)}")
    if not isinstance(body, dict):
        raise BadBatch(f"line {number}: body must be a JSON object (the request its url takes)")
    if body.get("stream"):
        raise BadBatch(f"line {number}: body.stream must be false in a batch (its result is one response)")
    return custom_id, url, body


def check_input(path: str, model_names: list[str]) -> int:
    """The number of requests in the file; BadBatch naming its first bad lines (all of it is read).
    A body that names a model other than ``model_names`` is one: each such request would fail."""
    errors, num_errors, seen, other_models = [], 0, set(), {}  # other model -> (its first line, lines)

    def bad(problem: str) -> None:
        nonlocal num_errors
        num_errors += 1
        if len(errors) < _ERRORS_SAID:  # (a file of a million bad lines keeps ten messages)
            errors.append(problem)

    for number, text in _lines(path):
        try:
            custom_id, _, body = _request(number, text)
        except BadBatch as err:
            bad(str(err))
            continue
        if custom_id in seen:
            bad(f"line {number}: custom_id {custom_id[:100]!r} is an earlier line's too")
        if isinstance(body.get("model"), str) and body["model"] not in model_names:
            first, count = other_models.get(body["model"], (number, 0))
            other_models[body["model"]] = (first, count + 1)
        seen.add(custom_id)
    for model, (first, count) in other_models.items():
        bad(f"line {first}{f' and {count - 1} more' if count > 1 else ''}: body.model {model[:100]!r} is not the "
            f"model run here ({', '.join(map(repr, model_names))}; --served-model-name names it)")
    if errors:
        more = f"; and {num_errors - len(errors)} more" if num_errors > len(errors) else ""
        raise BadBatch(f"{path}: " + "; ".join(errors) + more)
    if not seen:
        raise BadBatch(f"{path}: no requests in it")
    return len(seen)


def results_written(output: str, input_path: str) -> int:
    """How many results ``output`` holds: those of the input's first requests, in order, each on a
    whole line (read as a stream: an output may be large). A last line a crash cut short is cut
    off the file; results of other requests are BadBatch (a new output file is wanted)."""
    if not os.path.exists(output):
        return 0
    count, whole_bytes, requests = 0, 0, requests_in(input_path)
    with open(output, "rb") as f:
        for text in f:
            if not text.endswith(b"\n"):  # the last line, cut short
                break
            count += 1
            try:
                done = json.loads(text)["custom_id"]
            except (ValueError, KeyError, TypeError):
                raise BadBatch(f"--output-file {output!r}: line {count} is not a result line") from None
            request = next(requests, None)
            if request is None or request[1] != done:
                theirs = "no request" if request is None else f"{request[1][:100]!r}"
                raise BadBatch(f"--output-file {output!r} holds results of other requests (its line {count} is "
                               f"{str(done)[:100]!r}'s result, the input's request {count} is {theirs}): give a "
                               "new output file")
            whole_bytes += len(text)
    if whole_bytes < os.path.getsize(output):
        with open(output, "r+b") as f:
            f.truncate(whole_bytes)
    return count


class _NoClientLeaves:
    """The receive channel of a request no client can leave: its body, then nothing."""

    def __init__(self, body: bytes):
        self.messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def __call__(self) -> dict:
        if self.messages:
            return self.messages.pop()
        await asyncio.Future()  # (a route watching for the client leaving waits here, and moves on)
        raise AssertionError


async def post(app, path: str, body: bytes) -> tuple[int, bytes]:
    """The app's answer to a POST of ``body`` to ``path``, as an HTTP client would get it."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": b"", "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    status, chunks = 500, []

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    try:
        await app(scope, _NoClientLeaves(body), send)
    except Exception as err:  # a bug: Starlette raises it again after its 500 (uvicorn would log it): this line's
        logger.exception("request to %s failed", path)
        if not chunks:
            return 500, f"internal error: {type(err).__name__}: {err}".encode()  # (result_line frames it)
    return status, b"".join(chunks)


def result_line(custom_id: str, status: int, answer: bytes) -> str:
    """OpenAI's batch output line for one request's answer."""
    from pagedllm.entrypoints.openai.errors import error_body

    try:
        body = json.loads(answer)
    except ValueError:  # (not the app's JSON: its text as OpenAI's error JSON, as the server's errors are)
        body = error_body(status, answer.decode(errors="replace")[:1000])
    ok = status == 200
    request_id = body.get("id") if ok and isinstance(body, dict) else None
    return json.dumps({"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
                       "response": {"status_code": status, "request_id": request_id or f"req_{uuid.uuid4().hex}",
                                    "body": body},
                       "error": None if ok else body.get("error") if isinstance(body, dict) else body}) + "\n"


class InOrder:
    """Writes results in the input's order, each as soon as those before it are written."""

    def __init__(self, out: TextIO, first: int):
        self.out, self.next, self.waiting = out, first, {}

    def add(self, index: int, line: str) -> int:
        """Keep a result; write and flush those now in order. Returns how many were written."""
        self.waiting[index] = line
        written = 0
        while self.next in self.waiting:
            self.out.write(self.waiting.pop(self.next))
            self.next += 1
            written += 1
        if written:
            self.out.flush()
        return written


async def run_batch(args: argparse.Namespace, input_path: str, output_path: str, total: int, done: int) -> int:
    from pagedllm.entrypoints.openai.api_server import build_server

    args.api_key = None  # (no client here to give one)
    server = build_server(args)
    app = server.app()
    metrics = None
    if args.enable_metrics:
        from prometheus_client import start_http_server

        metrics, _ = start_http_server(args.port, args.url or args.host, registry=server.metrics.registry)
        logger.info("metrics at http://%s:%d/metrics", args.url or args.host, args.port)
    # Requests started and not yet written, at most: enough to keep the engine full, and a bound on
    # the results held back behind a long request before them (memory, and what a crash would lose).
    unwritten = asyncio.Semaphore(_UNWRITTEN_PER_SEQ * server.engine.config.max_num_seqs)
    stopped, statuses = False, Counter()

    async def one(index: int, custom_id: str, url: str, body: dict, writer: InOrder, bar) -> None:
        nonlocal stopped
        status, answer = await post(app, url, json.dumps(body).encode())
        if server.engine.error is not None:  # (its 503 is the engine's end, not this request's: not written)
            stopped = True
            unwritten.release()
            return
        statuses[status] += 1
        written = writer.add(index, result_line(custom_id, status, answer))
        bar.update(written)
        for _ in range(written):
            unwritten.release()

    try:
        with open(output_path, "a", encoding="utf-8") as out, \
                tqdm(total=total, initial=done, desc="Running batch", unit="req") as bar:
            writer, tasks = InOrder(out, done), set()
            for index, (_, custom_id, url, body) in enumerate(requests_in(input_path)):
                if index < done:
                    continue
                await unwritten.acquire()
                if stopped:
                    break
                task = asyncio.create_task(one(index, custom_id, url, body, writer, bar))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)
    finally:
        if metrics is not None:
            metrics.shutdown()
        server.shutdown()
    if stopped or server.engine.error is not None:
        logger.error("the engine stopped (%r): %d of %d results written; run again to go on", server.engine.error,
                     writer.next, total)
        return 1
    failed = sum(n for status, n in statuses.items() if status != 200)
    logger.info("%d results in %s; of this run's %d, %d answered and %d failed%s", writer.next, output_path,
                writer.next - done, statuses[200], failed,
                f" ({', '.join(f'{n} with status {s}' for s, n in sorted(statuses.items()) if s != 200)})"
                if failed else "")
    return 0


def run(args: argparse.Namespace) -> int:
    input_path = args.input_file
    try:
        if _is_url(args.input_file):
            input_path = download(args.input_file)
        output_path = local_output(args) if _is_url(args.output_file) else args.output_file
        return _run(args, input_path, output_path)
    except (BadBatch, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if input_path != args.input_file:
            os.unlink(input_path)


def _run(args: argparse.Namespace, input_path: str, output_path: str) -> int:
    total = check_input(input_path, args.served_model_name or [args.model])
    done = results_written(output_path, input_path)
    if done == total:
        logger.info("%s holds the results of all %d requests already", output_path, total)
    else:
        if done:
            logger.info("%s holds %d results already: going on with the other %d", output_path, done, total - done)
        try:
            status = asyncio.run(run_batch(args, input_path, output_path, total, done))
        except KeyboardInterrupt:
            print(f"stopped: the results in {output_path} are kept; run the same command again to go on",
                  file=sys.stderr)
            return 130
        if status:
            return status
    if _is_url(args.output_file):
        try:
            upload(output_path, args.output_file)
        except OSError as err:
            print(f"error: cannot upload the results to {args.output_file}: {err}; they are in {output_path}: run "
                  "the same command again to upload them", file=sys.stderr)
            return 1
        os.unlink(output_path)
        logger.info("uploaded the results to %s", args.output_file)
    return 0


def main(argv: list[str] | None = None) -> None:
    """``python -m pagedllm.entrypoints.openai.run_batch``, as ``pagedllm run-batch``."""
    from pagedllm.entrypoints.cli import main as cli

    sys.exit(cli(["run-batch", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    main()
