"""A sparse mixture-of-experts MLP (Mixtral, Qwen3-MoE, gpt-oss): a router picks each token's top_k
experts; the experts' gated MLPs run as one fused kernel over their stacked weights. Under
tensor parallelism every rank holds every expert's slice of the intermediate width (as a column-
then row-parallel MLP) and one all-reduce sums the ranks' outputs."""

import torch
import torch.nn as nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN

from pagedllm.distributed import all_reduce, tp_rank, tp_world_size
from pagedllm.layers.linear import check_full_shape, copy_checked, shard_units
from pagedllm.layers.triton_ops import clamped_swiglu, fused_moe, fused_on, silu_and_mul
from pagedllm_kernels.reference import clamped_swiglu_ref, fused_moe_ref, silu_and_mul_ref


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's top_k experts and their weights (float32): softmax over all experts, then
    the top_k, rescaled to sum to 1 where the checkpoint says (Mixtral always, Qwen3-MoE with
    ``norm_topk_prob``)."""
    weights, ids = torch.softmax(router_logits.float(), dim=-1).topk(top_k, dim=-1)
    return (weights / weights.sum(dim=-1, keepdim=True) if renormalize else weights), ids


class SparseMoeBlock(nn.Module):
    """``gate`` (the router, whole on every rank) and the experts: ``w13 [E, 2 * I_rank, H]`` (each
    expert's gate rows, then its up rows) and ``w2 [E, H, I_rank]``. A checkpoint's expert tensor
    arrives with ``part``: ``2e`` (gate) or ``2e + 1`` (up) of w13, ``e`` of w2."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, renormalize: bool,
                 activation: str, router_bias: bool = False):
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        self.shard = shard_units(intermediate_size)
        self.gate = nn.Linear(hidden_size, num_experts, bias=router_bias)
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * self.shard.size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, self.shard.size))
        self.w13.weight_loader, self.w13.num_parts = self._load_w13, 2 * num_experts
        self.w2.weight_loader, self.w2.num_parts = self._load_w2, num_experts
        self.w13.full_shape = (num_experts, 2 * intermediate_size, hidden_size)
        self.w2.full_shape = (num_experts, hidden_size, intermediate_size)
        self.w13_scale = self.w2_scale = None  # [E, 2I, 1] and [E, H, 1] once quantized to FP8
        self.w13_bias = self.w2_bias = None  # the experts' biases, where the checkpoint has them (gpt-oss)
        self.silu = activation == "silu"
        self.activation = ACT2FN[activation]
        self.tp_size = tp_world_size()
        self.first_rank = tp_rank() == 0  # the ranks' outputs are summed: the down projection's bias added once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)
        extra = (self.w13_scale, self.w2_scale, self.w13_bias, self.w2_bias if self.first_rank else None)
        if fused_on(x):
            out = fused_moe(x, self.w13, self.w2, weights, ids, self.activation_and_mul, *extra)
        else:
            out = fused_moe_ref(x, self.w13, self.w2, weights, ids, self.activation_and_mul, *extra)
        return all_reduce(out) if self.tp_size > 1 else out

    def activation_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``[rows, 2I]`` gate|up to ``[rows, I]``."""
        if self.silu:
            return (silu_and_mul if fused_on(gate_up) else silu_and_mul_ref)(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.activation(gate) * up

    def _load_w13(self, param: nn.Parameter, loaded, part: int | None) -> None:
        s, full = self.shard, self.w13.full_shape
        if part is None:  # all experts at once (random weights): [E, 2I, H]
            check_full_shape(loaded, full)
            copy_checked(param[:, : s.size], loaded[:, s.start : s.start + s.size])
            copy_checked(param[:, s.size :], loaded[:, s.full_size + s.start : s.full_size + s.start + s.size])
            return
        expert, up = divmod(part, 2)
        check_full_shape(loaded, (s.full_size, full[2]), f"expert {expert}'s {'up' if up else 'gate'} ")
        copy_checked(param[expert, up * s.size : (up + 1) * s.size], loaded[s.start : s.start + s.size])

    def _load_w2(self, param: nn.Parameter, loaded, part: int | None) -> None:
        s, full = self.shard, self.w2.full_shape
        if part is None:
            check_full_shape(loaded, full)
            copy_checked(param, loaded[:, :, s.start : s.start + s.size])
            return
        check_full_shape(loaded, full[1:], f"expert {part}'s down ")
        copy_checked(param[part], loaded[:, s.start : s.start + s.size])


class GptOssMoeBlock(SparseMoeBlock):
    """gpt-oss's experts: a router with a bias (softmax over its top_k logits: the same weights as
    ``route`` renormalizing), biases on both projections, its clamped SwiGLU. Its checkpoint keeps
    all experts in one tensor each, ``gate_up_proj [E, H, 2I]`` with gate and up columns
    interleaved, ``down_proj [E, I, H]`` (the transposes of w13/w2), and ``[E, 2I]``/``[E, H]`` biases;
    ``full_shape`` gives those shapes, so random weights load through the same loaders."""

    def __init__(self, config: PretrainedConfig):
        super().__init__(config.hidden_size, config.intermediate_size, config.num_local_experts,
                         config.num_experts_per_tok, True, "silu", router_bias=True)
        num_experts, hidden, inter = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.w13_bias = nn.Parameter(torch.empty(num_experts, 2 * self.shard.size))
        self.w2_bias = nn.Parameter(torch.empty(num_experts, hidden))
        self.w13.full_shape, self.w13_bias.full_shape = (num_experts, hidden, 2 * inter), (num_experts, 2 * inter)
        self.w2.full_shape = (num_experts, inter, hidden)
        self.w13.weight_loader, self.w13_bias.weight_loader = self._load_gate_up, self._load_gate_up
        self.w2.weight_loader = self._load_down
        # (transformers before 5.25 fixes both, and its configs lack them)
        self.alpha, self.limit = getattr(config, "swiglu_alpha", 1.702), getattr(config, "swiglu_limit", 7.0)

    def activation_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return (clamped_swiglu if fused_on(gate_up) else clamped_swiglu_ref)(gate_up, self.alpha, self.limit)

    def _load_gate_up(self, param: nn.Parameter, loaded, part: int | None) -> None:
        """w13 from ``[E, H, 2I]`` or its bias from ``[E, 2I]``: this rank's gate columns (even)
        first, then its up columns (odd)."""
        s = self.shard
        check_full_shape(loaded, param.full_shape)
        span = slice(2 * s.start, 2 * (s.start + s.size))
        cols = loaded[:, :, span].transpose(1, 2) if param.dim() == 3 else loaded[:, span]
        copy_checked(param[:, : s.size], cols[:, 0::2])
        copy_checked(param[:, s.size :], cols[:, 1::2])

    def _load_down(self, param: nn.Parameter, loaded, part: int | None) -> None:
        s = self.shard
        check_full_shape(loaded, param.full_shape)
        copy_checked(param, loaded[:, s.start : s.start + s.size].transpose(1, 2))
