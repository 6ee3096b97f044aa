"""The sampled token's log-probability under each row's logits, in one pass over the row (online
max and sum of exponentials), instead of torch's several passes for logsumexp over a
[rows, vocab] float32 copy (reference: token_logprobs_ref). Every step needs it, for
cumulative_logprob. Greedy rows take their argmax in the same pass (greedy_sample), so an
all-greedy step reads its logits once. A row's vocabulary is split over several programs where
rows are few: one program walking 152k logits alone took 62 us of a 1.4 ms decode step at batch 4 (H200).
The number of splits is a runtime value (at most _MAX_SPLITS), so that every batch size runs the
same few compiled kernels: as a constant, each new power of two compiled mid-run (1.2 s of W3)."""

import torch
import triton
import triton.language as tl

from pagedllm_kernels.paged_attention import num_sms
from pagedllm_kernels.pdl import pdl, wait_for_previous

_BLOCK = 1024
_MAX_SPLITS = 64


@triton.jit(do_not_specialize=["num_splits"])  # num_splits varies by step: one compiled kernel for all
def _token_logprobs_kernel(logits_ptr, token_ids_ptr, out_ptr, max_ptr, sum_ptr, arg_ptr, vocab, stride, per_split,
                           num_splits, SPLIT: tl.constexpr, ARGMAX: tl.constexpr, BLOCK: tl.constexpr,
                           PDL: tl.constexpr):
    """Per (row, split): max and sum of exponentials over the split's logits (and, with ARGMAX, the
    first index of the max); with one split, the row's token (written with ARGMAX) and its logprob."""
    wait_for_previous(PDL)
    row = tl.program_id(0)
    split = tl.program_id(1)
    base = logits_ptr + row.to(tl.int64) * stride
    lo = split * per_split
    hi = tl.minimum(lo + per_split, vocab)
    running_max = tl.full([BLOCK], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK], dtype=tl.float32)
    best = tl.zeros([BLOCK], dtype=tl.int32)  # per lane, the first index of its max
    for start in range(lo, hi, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        x = tl.load(base + offsets, mask=offsets < hi, other=float("-inf")).to(tl.float32)
        if ARGMAX:
            best = tl.where(x > running_max, offsets, best)
        new_max = tl.maximum(running_max, x)
        scale = tl.where(new_max == float("-inf"), 0.0, tl.exp(running_max - new_max))
        running_sum = running_sum * scale + tl.where(x == float("-inf"), 0.0, tl.exp(x - new_max))
        running_max = new_max
    part_max = tl.max(running_max, axis=0)
    part_sum = tl.sum(tl.where(running_max == float("-inf"), 0.0, running_sum * tl.exp(running_max - part_max)), axis=0)
    part_arg = tl.min(tl.where(running_max == part_max, best, vocab), axis=0)
    if not SPLIT:
        if ARGMAX:
            tl.store(token_ids_ptr + row, part_arg.to(tl.int64))
            logit = part_max
        else:
            logit = tl.load(base + tl.load(token_ids_ptr + row)).to(tl.float32)
        tl.store(out_ptr + row, logit - part_max - tl.log(part_sum))
    else:
        tl.store(max_ptr + row * num_splits + split, part_max)
        tl.store(sum_ptr + row * num_splits + split, part_sum)
        if ARGMAX:
            tl.store(arg_ptr + row * num_splits + split, part_arg)


@triton.jit(do_not_specialize=["num_splits"])  # num_splits varies by step: one compiled kernel for all
def _merge_logprob_splits_kernel(logits_ptr, token_ids_ptr, out_ptr, max_ptr, sum_ptr, arg_ptr, vocab, stride,
                                 num_splits, ARGMAX: tl.constexpr, MAX_SPLITS: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)
    row = tl.program_id(0)
    lanes = tl.arange(0, MAX_SPLITS)
    splits = row * num_splits + lanes
    used = lanes < num_splits
    part_max = tl.load(max_ptr + splits, mask=used, other=float("-inf"))
    row_max = tl.max(part_max, axis=0)
    part_sum = tl.load(sum_ptr + splits, mask=used, other=0.0)
    total = tl.sum(part_sum * tl.exp(part_max - row_max), axis=0)
    if ARGMAX:  # splits hold increasing indices: the first split reaching the max has the first index
        part_arg = tl.load(arg_ptr + splits, mask=used, other=vocab)
        token = tl.min(tl.where(part_max == row_max, part_arg, vocab), axis=0)
        tl.store(token_ids_ptr + row, token.to(tl.int64))
        logit = row_max
    else:
        logit = tl.load(logits_ptr + row.to(tl.int64) * stride + tl.load(token_ids_ptr + row)).to(tl.float32)
    tl.store(out_ptr + row, logit - row_max - tl.log(total))


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_splits: int | None = None) -> torch.Tensor:
    """``log_softmax(logits.float())[row, token_ids[row]]`` for each row of a 2-D ``logits``.
    ``num_splits`` (at most _MAX_SPLITS) forces how many programs share a row (tests)."""
    return _launch(logits, token_ids, False, num_splits)


def greedy_sample(logits: torch.Tensor, num_splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's argmax (the first, as torch's) and its logprob, in one pass: ``greedy_sample_ref``."""
    token_ids = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    return token_ids, _launch(logits, token_ids, True, num_splits)


def _launch(logits: torch.Tensor, token_ids: torch.Tensor, argmax: bool, num_splits: int | None) -> torch.Tensor:
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if not rows:
        return out
    splits = num_splits or _logprob_splits(rows, vocab, logits.device)
    per_split = triton.cdiv(triton.cdiv(vocab, splits), _BLOCK) * _BLOCK
    parts = (out, out, out)
    if splits > 1:
        stats = torch.empty(2, rows, splits, dtype=torch.float32, device=logits.device)
        parts = (stats[0], stats[1], torch.empty(rows, splits, dtype=torch.int32, device=logits.device))
    common = dict(ARGMAX=argmax, **pdl(logits))
    _token_logprobs_kernel[(rows, splits)](logits, token_ids, out, *parts, vocab, logits.stride(0), per_split, splits,
                                           SPLIT=splits > 1, BLOCK=_BLOCK, **common)
    if splits > 1:
        _merge_logprob_splits_kernel[(rows,)](logits, token_ids, out, *parts, vocab, logits.stride(0), splits,
                                              MAX_SPLITS=_MAX_SPLITS, **common)
    return out


def _logprob_splits(rows: int, vocab: int, device: torch.device) -> int:
    """Programs per row: enough for two a streaming multiprocessor, each with four blocks of logits at least."""
    if device.type != "cuda":
        return 1
    return min(triton.cdiv(2 * num_sms(device), rows), triton.cdiv(vocab, 4 * _BLOCK), _MAX_SPLITS)


@triton.jit
def _seeded_exponential_kernel(noise_ptr, rows_ptr, seeds_ptr, positions_ptr, vocab, stride, BLOCK: tl.constexpr,
                               PDL: tl.constexpr):
    wait_for_previous(PDL)
    i = tl.program_id(0)
    row = tl.load(rows_ptr + i)
    seed = tl.load(seeds_ptr + i)
    position = tl.load(positions_ptr + i)
    token_ids = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    # Philox's counter: (token id, position); tl.randint takes them as one 64-bit offset
    bits = tl.randint(seed, (position << 32) | token_ids.to(tl.int64))
    uniform = ((bits >> 9).to(tl.int32) * 2 + 1).to(tl.float32) * 5.9604644775390625e-08  # (2k + 1) / 2**24
    tl.store(noise_ptr + row.to(tl.int64) * stride + token_ids, -tl.log(uniform), mask=token_ids < vocab)


def seeded_exponential_(noise: torch.Tensor, rows: torch.Tensor, seeds: torch.Tensor,
                        positions: torch.Tensor) -> torch.Tensor:
    """Overwrite ``noise[rows[i]]`` with Exponential(1) draws that depend only on ``seeds[i]``,
    ``positions[i]`` and the token id, in one launch for all seeded rows (a generator per row
    costs a launch per row and step). Reference: seeded_exponential_ref."""
    if len(rows):
        grid = (len(rows), triton.cdiv(noise.shape[1], 1024))
        _seeded_exponential_kernel[grid](noise, rows, seeds, positions, noise.shape[1], noise.stride(0), BLOCK=1024,
                                         **pdl(noise))
    return noise
