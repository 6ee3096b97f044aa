"""A bounded soak: a few hundred streamed requests (completions, chat and responses), dozens at once, a
third of the clients hanging up mid-stream (closing the stream, or dropping the socket); every other request
completes, and afterwards no request runs and no KV block is held, and a last request works."""

import asyncio
import json
import random
import time

import openai
import pytest
from test_openai_server import scrape, start_server

NUM_REQUESTS, CONCURRENCY, MAX_TOKENS = 480, 64, 12
LEAVERS_MAX_TOKENS = 150  # clients that hang up ask for long answers, so that they leave mid-stream


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    server, uv, url = start_server(tiny_checkpoint("llama"), "--served-model-name", "tiny", "--max-num-seqs", "32")
    yield server, url
    uv.should_exit = True
    server.engine.shutdown()


async def drop_the_socket(url: str, body: dict) -> str:
    """A client that vanishes: reads the first event, then resets the connection."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    data = json.dumps(body).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    await writer.drain()
    await reader.readuntil(b"data: ")
    writer.transport.abort()
    return "left"


async def one(client: openai.AsyncOpenAI, url: str, i: int, gate: asyncio.Semaphore) -> object:
    rng = random.Random(i)
    prompt = " ".join(rng.choice(["def", "main", "import", "os", "x", "=", "1"]) for _ in range(rng.randint(1, 30)))
    extra = {"ignore_eos": True}
    max_tokens = LEAVERS_MAX_TOKENS if i % 3 == 1 else MAX_TOKENS
    async with gate:
        if i % 3 == 1 and i % 2:
            return await drop_the_socket(url, {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens,
                                               "stream": True, **extra})
        if i % 13 == 0 and i % 5:  # the Responses API's typed events (it ends by EOS or by length)
            stream = await client.responses.create(model="tiny", input=prompt, max_output_tokens=max_tokens,
                                                   stream=True)
            last = None
            async for event in stream:
                if i % 3 == 1:
                    await stream.close()
                    return "left"
                last = event.type
            return int(last in ("response.completed", "response.incomplete"))
        if i % 7 == 0:
            stream = await client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, stream=True,
                logprobs=True, top_logprobs=2, extra_body=extra)
        else:
            stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, stream=True,
                                                     n=1 + (i % 5 == 0), seed=i, extra_body=extra)
        finished = set()
        async for chunk in stream:
            if i % 3 == 1:  # a client that closes its stream after the first chunk (a busy server may have put
                await stream.close()  # the whole answer in it: the engine runs ahead of the HTTP side)
                return "left"
            finished |= {c.index for c in chunk.choices if c.finish_reason == "length"}
        return len(finished)


def test_soak_with_clients_hanging_up(served):
    server, url = served
    aborted_before = scrape(url).get('pagedllm:request_success_total{finished_reason="abort"}', 0)

    async def run():
        gate = asyncio.Semaphore(CONCURRENCY)
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        results = await asyncio.gather(*[one(client, url, i, gate) for i in range(NUM_REQUESTS)],
                                       return_exceptions=True)
        await client.close()
        return results

    start = time.monotonic()
    results = asyncio.run(run())
    elapsed = time.monotonic() - start
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures[:3]
    left = results.count("left")
    assert left == NUM_REQUESTS // 3
    expected = [1 + (i % 5 == 0 and i % 7 != 0) for i in range(NUM_REQUESTS) if i % 3 != 1]
    assert [r for r in results if r != "left"] == expected  # every sample of every other request ran to length
    deadline = time.time() + 10
    while server.engine.num_unfinished_requests and time.time() < deadline:
        time.sleep(0.05)
    stats = server.engine.stats
    assert stats.num_running == stats.num_waiting == stats.kv_blocks_in_use == 0
    aborted = scrape(url)['pagedllm:request_success_total{finished_reason="abort"}'] - aborted_before
    # each left mid-stream and was aborted, but for a few whose whole answer had already reached the server (the
    # engine process runs ahead of a busy HTTP side, which then gets several tokens at once)
    assert 0.9 * left <= aborted <= left
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    assert client.completions.create(model="tiny", prompt="def main():", max_tokens=4).usage.completion_tokens == 4
    print(f"soak: {NUM_REQUESTS} streams, {CONCURRENCY} at once, {left} hung up, "
          f"{len(expected)} completed, in {elapsed:.1f} s")
