"""The sampled token's log-probability under each row's logits, in one pass over the row (online
max and sum of exponentials), instead of torch's several passes for logsumexp over a
[rows, vocab] float32 copy (reference: token_logprobs_ref). Every step needs it, for
cumulative_logprob."""

import torch
import triton
import triton.language as tl

from pagedllm_kernels.pdl import pdl, wait_for_previous


@triton.jit
def _token_logprobs_kernel(logits_ptr, token_ids_ptr, out_ptr, vocab, stride, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride
    running_max = tl.full([BLOCK], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, vocab, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        x = tl.load(base + offsets, mask=offsets < vocab, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, x)
        scale = tl.where(new_max == float("-inf"), 0.0, tl.exp(running_max - new_max))
        running_sum = running_sum * scale + tl.where(x == float("-inf"), 0.0, tl.exp(x - new_max))
        running_max = new_max
    row_max = tl.max(running_max, axis=0)
    total = tl.sum(running_sum * tl.exp(running_max - row_max), axis=0)
    token = tl.load(token_ids_ptr + row)
    logit = tl.load(base + token).to(tl.float32)
    tl.store(out_ptr + row, logit - row_max - tl.log(total))


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits.float())[row, token_ids[row]]`` for each row of a 2-D ``logits``."""
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _token_logprobs_kernel[(rows,)](logits, token_ids, out, vocab, logits.stride(0), BLOCK=1024, **pdl(logits))
    return out


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
