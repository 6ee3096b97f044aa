"""Serving benchmark: Poisson arrivals at several request rates against pagedllm's OpenAI server and,
in the same run on the same checkpoint and prompts, ``transformers serve --continuous-batching``.

Both get the same streamed chat completions (greedy, a fixed output length; pagedllm also gets
``ignore_eos``). Per engine and rate: throughput, time-to-first-token and inter-token latency
percentiles. The load comes from several client processes, so the client is not what is measured.
The checkpoint is the real config with random weights, saved once with a trained
byte-level tokenizer and a plain chat template (no hub is reachable).

Usage: python benchmarks/serve.py [--config qwen3-0.6b] [--rates 4 16 64 inf inf inf] [--peer transformers]
       [--api-server-count N [N ...]] [--stream-interval N [N ...]] [--out DIR]
"""

import argparse
import asyncio
import itertools
import json
import multiprocessing
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import environment, package_versions, write_result  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_configs")
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def build_checkpoint(config_path: str, dtype: torch.dtype, path: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from pagedllm.testing import build_tokenizer

    config = AutoConfig.from_pretrained(config_path)
    torch.manual_seed(0)  # the same weights, so the same streams, in every run: runs compare
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tokenizer = build_tokenizer()
    # The config's vocabulary is far larger than this tokenizer's, and ids it cannot write (or special
    # ones) stream no text. Zero their output rows so that greedy decoding picks writable tokens, as a
    # trained model would; otherwise most requests stream nothing to time.
    unwritable = torch.ones(config.vocab_size, dtype=torch.bool)
    unwritable[:len(tokenizer)] = False
    unwritable[tokenizer.all_special_ids] = True
    with torch.no_grad():
        model.get_output_embeddings().weight[unwritable.to(model.device)] = 0
    model.save_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)


def make_prompts(path: str, num_requests: int, input_len: int) -> list[str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    rng = random.Random(0)
    return [tokenizer.decode([rng.randrange(10, 500) for _ in range(input_len)]) for _ in range(num_requests)]


def start(command: list[str], url: str, log_path: str) -> subprocess.Popen:
    """Start a server and wait for its ``/health``. Its output goes to a file: an unread pipe would fill
    up and stall the server."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{command[0]} exited: {open(log_path).read()[-2000:]}")
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return process
        except OSError:
            time.sleep(0.5)
    process.terminate()
    raise RuntimeError(f"{command} did not start in 600 s: {open(log_path).read()[-2000:]}")


async def one_request(client, url: str, model: str, prompt: str, output_len: int, extra: dict) -> dict:
    """One streamed chat completion: when each content chunk came, and the completion tokens (from
    ``usage``, else one per chunk). ``transformers serve`` (5.17 and 5.24, continuous batching) sends the
    rendered prompt back as its first content: that echo is not a generated token, so it is cut."""
    start = time.time()  # wall-clock: comparable across the client processes
    times, tokens, echoed, chunks, finish_reason = [], None, False, 0, None
    rendered_prompt = f"user: {prompt}\nassistant:"  # CHAT_TEMPLATE's rendering
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": output_len,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, **extra}
    async with client.post(f"{url}/v1/chat/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:200]}")
        rest = b""
        async for data in response.content.iter_any():
            events, rest = sse_data(rest + data)
            for event in events:
                if "error" in event:  # (an error event ends a stream that had begun)
                    raise RuntimeError(f"error event: {json.dumps(event)[:200]}")
                chunks += 1
                choice = event["choices"][0] if event.get("choices") else {}
                content = (choice.get("delta") or {}).get("content")
                finish_reason = choice.get("finish_reason") or finish_reason
                if content and not times and content.startswith(rendered_prompt):
                    echoed, content = True, content[len(rendered_prompt):]
                if content:
                    times.append(time.time())
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
    return {"start": start, "times": times, "tokens": tokens if tokens is not None else len(times),
            "echoed": echoed, "chunks": chunks, "finish_reason": finish_reason}


def sse_data(buffer: bytes) -> tuple[list[dict], bytes]:
    """The JSON of each complete ``data:`` line in ``buffer`` (``[DONE]`` and other lines skipped),
    and what is left of an unfinished line."""
    *lines, rest = buffer.split(b"\n")
    events = []
    for line in lines:
        line = line.rstrip(b"\r")
        if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
            events.append(json.loads(line[5:]))
    return events, rest


async def send_shard(url: str, model: str, prompts: list[str], output_len: int, rate: float, extra: dict,
                     start_at: float, time_limit: float, seed: int) -> dict:
    """One client process's share of the load: Poisson arrivals at ``rate``/s from ``start_at``;
    requests not done ``time_limit`` s after it are cancelled and counted as stopped."""
    client = make_client()
    rng = random.Random(seed)
    await asyncio.sleep(max(0.0, start_at - time.time()))
    tasks = []
    for prompt in prompts:
        tasks.append(asyncio.create_task(one_request(client, url, model, prompt, output_len, extra)))
        if rate != float("inf"):
            await asyncio.sleep(rng.expovariate(rate))
    finished, unfinished = await asyncio.wait(tasks, timeout=max(0.0, start_at + time_limit - time.time()))
    end = time.time()
    for task in unfinished:
        task.cancel()
    await asyncio.gather(*unfinished, return_exceptions=True)
    await client.close()
    results = [repr(task.exception())[:200] if task.exception() else task.result() for task in finished]
    return {"end": end, "results": results, "stopped": len(unfinished)}


def run_shard(args: tuple) -> dict:
    return asyncio.run(send_shard(*args))


def run_load(pool, processes: int, url: str, model: str, prompts: list[str], output_len: int, rate: float,
             extra: dict, time_limit: float) -> dict:
    """Send every prompt at Poisson arrivals of ``rate``/s, split over the pool's client processes (one
    Python client parses only some thousands of chunks a second: alone it would be the bottleneck)."""
    asyncio.run(warm_up(url, model, prompts[0], extra))
    start_at = time.time() + 0.5
    shards = pool.map(run_shard, [(url, model, prompts[i::processes], output_len, rate / processes, extra,
                                   start_at, time_limit, i) for i in range(processes)])
    wall = max(shard["end"] for shard in shards) - start_at
    results = [r for shard in shards for r in shard["results"]]
    streams = [r for r in results if isinstance(r, dict)]
    done = [r for r in streams if r["times"] or r["finish_reason"]]  # ended well, if perhaps with no text
    timed = [r for r in done if r["times"]]
    ttft = [r["times"][0] - r["start"] for r in timed]
    itl = [b - a for r in timed for a, b in zip(r["times"], r["times"][1:], strict=False)]
    output_tokens = sum(r["tokens"] for r in done)

    def pct(values, q):
        return statistics.quantiles(values, n=100)[q - 1] * 1e3 if len(values) > 1 else None

    return {"rate": rate, "wall_s": wall, "client_processes": processes, "completed": len(done),
            "failed": len(results) - len(done), "stopped": sum(shard["stopped"] for shard in shards),
            "errors": sorted({r for r in results if isinstance(r, str)}),
            "no_text": len(done) - len(timed),  # in the tokens, not in the latencies
            "no_text_examples": [{k: r[k] for k in ("chunks", "tokens", "finish_reason", "echoed")}
                                 for r in streams if not r["times"]][:5],
            "output_tokens": output_tokens, "output_tokens_per_s": output_tokens / wall,
            "content_chunks": sum(len(r["times"]) for r in done),  # fewer than tokens: a busy server merged some
            "requests_per_s": len(done) / wall, "prompt_echoed": sum(r["echoed"] for r in done),
            **{f"ttft_p{q}_ms": pct(ttft, q) for q in (50, 90, 99)},
            **{f"itl_p{q}_ms": pct(itl, q) for q in (50, 90, 99)}}


async def warm_up(url: str, model: str, prompt: str, extra: dict) -> None:
    async with make_client(timeout=600) as client:
        await one_request(client, url, model, prompt, 8, extra)


def make_client(timeout: float = 3600):
    """An aiohttp session, as vLLM's serving benchmark uses: it parses a streamed chunk in ~60 us of CPU,
    where the openai client (3.60, on httpx2) took ~250 on a 2-core x86 CPU, so the load's processes
    stay far from busy. No retries: a failed request is reported, not hidden; no connection limit."""
    import aiohttp

    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout),
                                 connector=aiohttp.TCPConnector(limit=0))


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (Linux; 0 elsewhere, or once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_s(pid: int) -> float:
    """The CPU seconds of a process's live children (pagedllm's engine process, for its server)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return sum(cpu_s(int(c)) for c in f.read().split())
    except OSError:
        return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def benchmark_engine(name: str, command: list[str], url: str, model: str, extra: dict, args, pool,
                     prompts: list[str]) -> dict:
    process = None
    try:
        process = start(command, url, os.path.join(tempfile.gettempdir(), f"serve-{name}.log"))
        # One untimed flood of every prompt first: a fresh server compiles and tunes kernels for the shapes
        # its first batches bring (seconds, on a 2 s flood), as the offline run's first pass does
        run_load(pool, args.client_processes, url, model, prompts, args.output_len, float("inf"), extra,
                 args.time_limit)
        runs = []
        for rate in args.rates:
            clients = [worker.pid for worker in pool._pool]  # (multiprocessing.Pool keeps its processes there)
            before = (cpu_s(process.pid), children_cpu_s(process.pid), [cpu_s(c) for c in clients])
            run = run_load(pool, args.client_processes, url, model, prompts, args.output_len, rate, extra,
                           args.time_limit)
            after = (cpu_s(process.pid), children_cpu_s(process.pid), [cpu_s(c) for c in clients])
            # CPU seconds of the server's process (HTTP), of its children (pagedllm's engine process) and of the
            # busiest client process, against wall_s: a process near 1 CPU-second a second holds the rest back
            run["server_process_cpu_s"] = after[0] - before[0]
            run["child_processes_cpu_s"] = after[1] - before[1]
            run["busiest_client_process_cpu_s"] = max(b - a for a, b in zip(before[2], after[2], strict=True))
            print(f"{name:>22} rate {rate:>5}: {run['output_tokens_per_s']:8.0f} out tok/s, "
                  f"TTFT p50 {run['ttft_p50_ms'] or 0:7.1f} ms p99 {run['ttft_p99_ms'] or 0:7.1f} ms, "
                  f"ITL p50 {run['itl_p50_ms'] or 0:6.1f} ms, failed {run['failed']}, "
                  f"no text {run['no_text']}, stopped {run['stopped']}, server CPU "
                  f"{run['server_process_cpu_s'] / run['wall_s']:.2f} s/s (children "
                  f"{run['child_processes_cpu_s'] / run['wall_s']:.2f}, busiest client "
                  f"{run['busiest_client_process_cpu_s'] / run['wall_s']:.2f})", flush=True)
            runs.append(run)
        return {"engine": name, "runs": runs}
    except Exception as err:
        return {"engine": name, "error": f"{type(err).__name__}: {err}"[:500]}
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=60)


def offline_throughput(path: str, dtype: str, device: str, prompts: list[str], output_len: int) -> dict:
    """The in-process ``LLM`` on the same prompts as the server sees them (the chat template applied),
    all at once: the ceiling that served throughput at rate inf is compared with."""
    from transformers import AutoTokenizer

    from pagedllm import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(path)
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=True) for p in prompts]
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    with LLM(path, dtype=dtype, device=device) as llm:
        llm.generate(rendered, params, use_tqdm=False)  # warm: the server's timed runs follow its own warm-up flood
        start = time.perf_counter()
        outputs = llm.generate(rendered, params, use_tqdm=False)
        wall = time.perf_counter() - start
        config = llm.llm_engine.config
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    # at the LLM's defaults, as a user runs it: on a large GPU more tokens a step than the server takes
    return {"wall_s": wall, "output_tokens": tokens, "output_tokens_per_s": tokens / wall,
            "max_num_seqs": config.max_num_seqs, "max_num_batched_tokens": config.max_num_batched_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="qwen3-0.6b", help="a name in benchmarks/model_configs, or a path")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rates", type=float, nargs="+", default=[4, 16, 64, float("inf"), float("inf"), float("inf")])
    parser.add_argument("--peer", choices=["transformers", "none"], default="transformers")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--time-limit", type=float, default=300,
                        help="seconds per engine and rate; requests still running then are stopped and reported")
    parser.add_argument("--client-processes", type=int, default=8)
    parser.add_argument("--api-server-count", type=int, nargs="+", default=[1],
                        help="pagedllm's HTTP processes (its --api-server-count), one server per value, in turn; past "
                             "1 the server's own process only watches them, and their CPU counts with the engine "
                             "process's as its children's")
    parser.add_argument("--stream-interval", type=int, nargs="+", default=[1],
                        help="pagedllm's --stream-interval (tokens a streamed chunk waits for after the first), one "
                             "server per value and API-server count")
    parser.add_argument("--out", help="also write the JSON here (the device tool's $OUT)")
    args = parser.parse_args()
    from pagedllm.config import SERVER_MAX_NUM_BATCHED_TOKENS  # (not at the top: the client processes import this file)

    config_path = args.config if os.path.exists(args.config) else os.path.join(CONFIGS, f"{args.config}.json")
    path = tempfile.mkdtemp(prefix="pagedllm-serve-")
    build_checkpoint(config_path, getattr(torch, args.dtype), path)
    prompts = make_prompts(path, args.num_requests, args.input_len)

    pool = multiprocessing.get_context("spawn").Pool(args.client_processes)
    pool.map(time.sleep, [0.5] * args.client_processes, chunksize=1)  # every client process up and imported
    with multiprocessing.get_context("spawn").Pool(1) as offline_pool:  # its GPU memory freed after
        offline = offline_pool.apply(offline_throughput, (path, args.dtype, args.device, prompts, args.output_len))
    print(f"{'offline LLM':>22}           : {offline['output_tokens_per_s']:8.0f} out tok/s", flush=True)
    engines = []
    for count, interval in itertools.product(args.api_server_count, args.stream_interval):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        settings = [f"{count} API servers"] * (count > 1) + [f"stream interval {interval}"] * (interval > 1)
        ours = benchmark_engine(
            "pagedllm" + (f" ({', '.join(settings)})" if settings else ""),
            [sys.executable, "-m", "pagedllm.entrypoints.openai.api_server", "--model", path, "--host", "127.0.0.1",
             "--port", str(port), "--served-model-name", "bench", "--dtype", args.dtype, "--device", args.device,
             "--api-server-count", str(count), "--stream-interval", str(interval),
             "--max-num-batched-tokens", str(SERVER_MAX_NUM_BATCHED_TOKENS)],
            url, "bench", {"ignore_eos": True}, args, pool, prompts)
        ours["stream_interval"] = interval
        ours["api_server_count"] = count
        ours["max_num_batched_tokens"] = SERVER_MAX_NUM_BATCHED_TOKENS
        served = [r["output_tokens_per_s"] / offline["output_tokens_per_s"]
                  for r in ours.get("runs", []) if r["rate"] == float("inf")]
        if served:  # one flood of 200 streams lasts ~1.5 s on an H200 and varies by a third: give it as "inf inf inf"
            ours["served_over_offline_at_rate_inf"] = statistics.median(served)
            ours["served_over_offline_at_rate_inf_runs"] = served
            print(f"{ours['engine']}: served / offline at rate inf: {statistics.median(served):.2f} (median of "
                  f"{len(served)}: {', '.join(f'{s:.2f}' for s in served)})")
        engines.append(ours)
    if args.peer == "transformers":
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        engines.append(benchmark_engine(
            "transformers-serve-cb", [sys.executable, "-c", "from transformers.cli.transformers import main; main()",
                                      "serve", path, "--continuous-batching", "--host", "127.0.0.1",
                                      "--port", str(port)],
            url, path, {}, args, pool, prompts))
    pool.close()
    payload = {"benchmark": "serve", "model_config": os.path.basename(config_path).removesuffix(".json"),
               "dtype": args.dtype, "num_requests": args.num_requests, "input_len": args.input_len,
               "output_len": args.output_len, "client_processes": args.client_processes,
               "time_limit_s": args.time_limit, "client": "aiohttp (one session a process)",
               "environment": environment(),
               # the HTTP stack and the client, which the served figures depend on as much as the engine
               "packages": package_versions(["fastapi", "starlette", "uvicorn", "httptools", "uvloop", "anyio",
                                             "pydantic", "aiohttp"]),
               "offline": offline,
               "engines": engines}
    if args.peer != "none":
        print(f"wrote {write_result('serve', payload, args.out)}")
    elif args.out:  # without its peer it is not a result, but the device tool still brings it back
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "serve-no-peer.json"), "w") as f:
            json.dump(payload, f, indent=2)


if __name__ == "__main__":
    main()
