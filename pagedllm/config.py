"""Engine settings: one dataclass, validated and resolved (model files, dtype, lengths) up front,
so that a bad setting fails before any weight is loaded."""

from dataclasses import dataclass, field

import torch
from transformers import PretrainedConfig

from pagedllm.models.loader import load_hf_config, resolve_model_path
from pagedllm.models.registry import get_model_class

_DTYPES = {
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
}
LOAD_FORMATS = ("auto", "safetensors", "pt", "dummy")
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192


@dataclass
class EngineConfig:
    """The arguments of ``LLM(...)``; see the README for what each one does."""

    model: str
    tokenizer: str | None = None
    dtype: str | torch.dtype = "auto"
    device: str = "auto"
    seed: int | None = 0  # None: sampling noise differs run to run (dummy weights still use 0)
    block_size: int = 16
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None
    load_format: str = "auto"
    enforce_eager: bool = False
    tensor_parallel_size: int = 1
    enable_prefix_caching: bool = True
    async_scheduling: bool = True  # schedule the next step while the device runs this one (one rank only)
    max_logprobs: int = 20  # the most logprobs / prompt_logprobs a request may ask for, as in vLLM

    model_path: str = field(init=False)
    hf_config: PretrainedConfig = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _require(self.block_size >= 1 and self.block_size & (self.block_size - 1) == 0,
                 "block_size", self.block_size, "a power of two")
        _require(self.max_num_seqs >= 1, "max_num_seqs", self.max_num_seqs, ">= 1")
        _require(0 < self.gpu_memory_utilization <= 1,
                 "gpu_memory_utilization", self.gpu_memory_utilization, "in (0, 1]")
        _require(self.num_kv_blocks is None or self.num_kv_blocks >= 1,
                 "num_kv_blocks", self.num_kv_blocks, ">= 1 or None")
        _require(self.load_format in LOAD_FORMATS, "load_format", self.load_format, f"one of {LOAD_FORMATS}")
        _require(self.max_logprobs >= 0, "max_logprobs", self.max_logprobs, ">= 0")
        _require(self.seed is None or isinstance(self.seed, int), "seed", self.seed, "an int or None")
        _require(self.tensor_parallel_size >= 1, "tensor_parallel_size", self.tensor_parallel_size, ">= 1")
        self.device = _resolve_device(self.device)
        if self.tensor_parallel_size > 1 and self.device.startswith("cuda"):
            gpus = torch.cuda.device_count()
            _require(self.device == "cuda" and self.tensor_parallel_size <= gpus, "tensor_parallel_size",
                     self.tensor_parallel_size, f"at most the {gpus} GPUs torch sees, with device='cuda' (rank r "
                     f"runs on GPU r), not {self.device!r}")

        self.model_path = resolve_model_path(self.model)
        self.hf_config = load_hf_config(self.model_path)
        get_model_class(self.hf_config)  # unknown architectures fail here, before loading
        _check_tensor_parallel(self.hf_config, self.tensor_parallel_size)
        if self.tokenizer is None:
            self.tokenizer = self.model_path
        self.dtype = _resolve_dtype(self.dtype, self.hf_config, self.device)

        model_max = derive_max_model_len(self.hf_config)
        if self.max_model_len is None:
            self.max_model_len = model_max
        _require(1 <= self.max_model_len <= model_max, "max_model_len", self.max_model_len,
                 f"between 1 and the model's maximum context length ({model_max})")
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = DEFAULT_MAX_NUM_BATCHED_TOKENS
        _require(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", self.max_num_batched_tokens, ">= 1")


def derive_max_model_len(hf_config: PretrainedConfig) -> int:
    """The longest context the model's position scheme covers."""
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(hf_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError("config.json gives no maximum context length (max_position_embeddings or n_positions)")


def _check_tensor_parallel(hf_config: PretrainedConfig, tp_size: int) -> None:
    """Each rank needs whole query heads and an even share of the MLP; KV heads are split, or each
    shared by several ranks when there are fewer of them than ranks."""
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    mlp = next((v for k in ("intermediate_size", "ffn_dim", "n_inner") if (v := getattr(hf_config, k, None))),
               4 * hf_config.hidden_size)
    for what, count in (("attention heads", heads), ("MLP width", mlp)):
        if count % tp_size:
            raise ValueError(f"tensor_parallel_size={tp_size} is invalid for this model: its {count} {what} "
                             f"do not split evenly over {tp_size} ranks")
    if kv_heads % tp_size and tp_size % kv_heads:
        raise ValueError(f"tensor_parallel_size={tp_size} is invalid for this model: its {kv_heads} KV heads "
                         f"neither split over {tp_size} ranks nor divide them")


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for, but torch sees no CUDA GPU; use device='cpu'")
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r} is not supported: use 'auto', 'cpu' or 'cuda'")
    return device


def _resolve_dtype(dtype: str | torch.dtype, hf_config: PretrainedConfig, device: str) -> torch.dtype:
    """'auto' keeps the checkpoint's dtype, except that float32 runs as float16 on a GPU (as in vLLM)."""
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype == "auto":
        resolved = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or torch.float32
        if isinstance(resolved, str):
            resolved = _DTYPES.get(resolved, torch.float32)
        if resolved == torch.float32 and device.startswith("cuda"):
            resolved = torch.float16
    elif dtype in _DTYPES:
        resolved = _DTYPES[dtype]
    else:
        raise ValueError(f"dtype={dtype!r} is invalid: use 'auto' or one of {sorted(_DTYPES)}")
    if resolved not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype={resolved} is not supported: use float16, bfloat16 or float32")
    return resolved


def _require(ok: bool, name: str, value: object, rule: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: it must be {rule}")
