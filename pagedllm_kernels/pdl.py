"""Programmatic dependent launch (Hopper and newer): a kernel launched with it is scheduled while
the kernel before it in the stream finishes, and waits at its start (``griddepcontrol.wait``)
until that kernel has ended and its writes are visible. A decode step of one stream is ~360
kernels of a few microseconds each, and each otherwise pays its launch and ramp after the last
one's tail: on an H200, Llama-3-8B's 128 FP8 linears at one row with their quantizing kernels
took 2.28 ms in a CUDA graph with it against 2.45 without.

Every kernel here starts with ``wait_for_previous(PDL)`` and is launched with ``**pdl(x)``:
both or neither, since a kernel launched early that did not wait would read its inputs before
they are written. (The few-rows product reads nothing before it waits but its weights, which no
kernel writes, into L2; and lets the next start only after its loop, with ``let_next_start``.) A
kernel launched without it (torch's, cuBLAS's) waits for the whole of the one before, as ever."""

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

ENABLED = os.environ.get("PAGEDLLM_PDL", "1") != "0"  # (benchmarks compare without it)


@triton.jit
def wait_for_previous(PDL: tl.constexpr, LET_NEXT_START: tl.constexpr = True):
    if PDL:
        gdc_wait()  # the kernel before has ended, its writes visible
        if LET_NEXT_START:
            gdc_launch_dependents()  # the next may be scheduled now: it waits for this one likewise


@triton.jit
def let_next_start(PDL: tl.constexpr):
    """For a kernel that waited with ``LET_NEXT_START=False``: the next may be scheduled from here
    (a program that ends without it counts as having let it)."""
    if PDL:
        gdc_launch_dependents()


def pdl(x: torch.Tensor) -> dict:
    """Launch options of a kernel over ``x``'s device: dependent launch on a GPU that has it."""
    if not x.is_cuda or not ENABLED:
        return {"PDL": False}
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return {"PDL": True, "launch_pdl": True} if _has_pdl(index) else {"PDL": False}


@functools.cache
def _has_pdl(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9
