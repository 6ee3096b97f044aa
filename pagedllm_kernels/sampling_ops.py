"""The sampled token's log-probability under each row's logits, in one pass over the row (online
max and sum of exponentials), instead of torch's several passes for logsumexp over a
[rows, vocab] float32 copy (reference: token_logprobs_ref). Every step needs it, for
cumulative_logprob."""

import torch
import triton
import triton.language as tl


@triton.jit
def _token_logprobs_kernel(logits_ptr, token_ids_ptr, out_ptr, vocab, stride, BLOCK: tl.constexpr):
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
        _token_logprobs_kernel[(rows,)](logits, token_ids, out, vocab, logits.stride(0), BLOCK=1024)
    return out
