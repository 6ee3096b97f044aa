"""What stands between a client and the routes: the API key, a cap on request bodies, and time
limits on reading them, as plain ASGI (Starlette's ``BaseHTTPMiddleware`` would put a task group
and a memory stream between each streamed chunk and the socket, about a quarter of the HTTP
side's time at 200 streams, py-spy on the H200)."""

import asyncio
import hmac
import json

from starlette.exceptions import HTTPException

from pagedllm.entrypoints.openai.errors import error_body, error_response

MAX_HEAD_BYTES = 64 << 10  # a request line and headers; real clients send about 1 KiB

try:  # uvicorn's own choice: the C parser where it is installed (the server extra installs it)
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

    class HTTPProtocol(HttpToolsProtocol):
        """httptools' protocol with a cap on the request head: the parser keeps whatever a header
        grows to (a client streaming one endless header filled memory), where h11 stops at 16 KiB.
        Its 400s (the cap, a request it cannot parse) are OpenAI's error JSON, as every other error."""

        head_bytes, reading_head, head_ended = 0, True, False

        def data_received(self, data: bytes) -> None:
            in_head, self.head_ended = self.reading_head, False
            super().data_received(data)
            if in_head and not self.head_ended:  # all of it went to a head that is not complete yet
                self.head_bytes += len(data)
                if self.head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
                    self.send_400_response(f"The request head is larger than {MAX_HEAD_BYTES} bytes.")

        def on_headers_complete(self) -> None:
            self.reading_head, self.head_ended, self.head_bytes = False, True, 0
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self.reading_head = True  # the next request's head, on a kept-alive connection

        def send_400_response(self, msg: str) -> None:
            body = json.dumps(error_body(400, msg)).encode()
            head = [STATUS_LINE[400]] + [b"%s: %s\r\n" % header for header in self.server_state.default_headers]
            head += [b"content-type: application/json\r\n", b"content-length: %d\r\n" % len(body),
                     b"connection: close\r\n\r\n"]
            self.transport.write(b"".join(head) + body)
            self.transport.close()
except ImportError:
    from uvicorn.protocols.http.h11_impl import H11Protocol as HTTPProtocol

# Routes anyone may call without the key, as in vLLM: probes and scrapes.
OPEN_ROUTES = ("/health", "/ping", "/version", "/metrics")


class ApiKeyCheck:
    """Every route but the probes and /metrics (``OPEN_ROUTES``) needs ``Authorization: Bearer <key>``."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_ROUTES:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = error_response(401, "invalid or missing API key: send 'Authorization: Bearer <key>'")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimits:
    """A body larger than ``max_bytes`` gets 413 (at once if its Content-Length says so, else as
    soon as it grows past it); a body that stops arriving for ``read_timeout`` seconds gets 408,
    so a client that sends half a body cannot hold a connection forever."""

    def __init__(self, app, max_bytes: int, read_timeout: float):
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout = read_timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            message = f"the request body is larger than {self.max_bytes} bytes (--max-request-bytes)"
            await error_response(413, message)(scope, receive, send)
            return
        received, body_done = 0, False

        async def limited_receive():
            nonlocal received, body_done
            if body_done:  # afterwards the app only listens for the client leaving
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout)
            except TimeoutError:
                raise HTTPException(408, f"no part of the request body arrived for {self.read_timeout:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_bytes:
                    raise HTTPException(413, f"the request body is larger than {self.max_bytes} bytes "
                                             "(--max-request-bytes)")
            return message

        await self.app(scope, limited_receive, send)


def http_with_head_timeout(timeout: float) -> type[HTTPProtocol]:
    """uvicorn's HTTP/1.1 protocol (httptools where installed: its sends cost a third of h11's,
    and a streamed server sends a chunk per token; its head capped as h11 caps it), closing a
    connection whose next request head has not arrived within ``timeout`` seconds of opening it or
    of the last response (uvicorn's own keep-alive timer stops at the first byte, so a client
    sending its headers a byte at a time, or nothing at all, would hold the connection forever)."""

    class WithHeadTimeout(HTTPProtocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._expect_head()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._expect_head()

        def _expect_head(self) -> None:
            cycle = self.cycle
            self.loop.call_later(timeout, self._close_if_no_new_request, cycle)

        def _close_if_no_new_request(self, cycle) -> None:
            idle = self.cycle is cycle and (cycle is None or cycle.response_complete)
            if idle and not self.transport.is_closing():
                self.transport.close()

    return WithHeadTimeout
