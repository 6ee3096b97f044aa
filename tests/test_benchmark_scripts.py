"""The benchmark scripts as they are run (`python benchmarks/X.py`), and the serving benchmark's client."""

import importlib.util
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import serve  # noqa: E402

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def test_no_benchmark_script_is_named_as_an_installed_module():
    """A script run as `python benchmarks/X.py` puts benchmarks/ first on sys.path, so a file there
    named as an installed module is imported in its place: benchmarks/kernels.py stood in for the
    `kernels` package that transformers 5.25 imports, and every script failed at its imports."""
    names = [f.removesuffix(".py") for f in os.listdir(BENCHMARKS) if f.endswith(".py") and f != "__init__.py"]
    assert [name for name in names if importlib.util.find_spec(name) is not None] == []


def test_serve_client_reads_server_sent_events_however_they_are_cut():
    stream = (b'data: {"choices": [{"delta": {"content": "a"}}]}\r\n\r\n: a comment\n\n'
              b'data:{"usage": {"completion_tokens": 2}}\n\ndata: [DONE]\n\n')
    whole = [{"choices": [{"delta": {"content": "a"}}]}, {"usage": {"completion_tokens": 2}}]
    for cut in range(len(stream) + 1):
        first, rest = serve.sse_data(stream[:cut])
        second, rest = serve.sse_data(rest + stream[cut:])
        assert (first + second, rest) == (whole, b"")
