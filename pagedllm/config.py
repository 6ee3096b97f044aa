"""Engine settings: one dataclass, validated and resolved (model files, dtype, lengths) up front,
so that a bad setting fails before any weight is loaded."""

import ctypes
import logging
import math
from dataclasses import dataclass, field, fields

import torch
from transformers import PretrainedConfig

from pagedllm.models.fp8_checkpoint import fp8_checkpoint
from pagedllm.models.loader import load_hf_config, resolve_model_path
from pagedllm.models.registry import get_model_class
from pagedllm.reasoning import REASONING_PARSERS
from pagedllm.sampling_params import is_int, is_real

_DTYPES = {
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
}
LOAD_FORMATS = ("auto", "safetensors", "pt", "dummy")
# vLLM's LLM-class defaults (max_num_seqs, max_num_batched_tokens): larger on a GPU of >= 70 GiB other than an A100
# (W1 on an H100: 28,700 output tok/s at 1024 / 16384 against 26,800 at 256 / 8192, its 512 requests in one batch)
LARGE_GPU_BATCH, BATCH = (1024, 16384), (256, 8192)
# the server's step at most, on any GPU (vLLM's server on the large ones): a longer one holds back every stream's token
SERVER_MAX_NUM_BATCHED_TOKENS = 8192
MAX_BATCH = 1 << 20  # max_num_seqs: sequences in one step
MAX_BATCH_TOKENS = 1 << 24  # max_num_batched_tokens: tokens in one step (its activations are profiled)
logger = logging.getLogger("pagedllm")


def option(default, help: str, compat: str | None = None, only: tuple | None = None, why: str = ""):
    """An engine option: its default and help (the CLI flag's too). ``compat``: accepted for vLLM
    scripts only; says at INFO what the option does here when a script sets it. ``only``: a vLLM
    option taken at these values only, others refused with ``why`` (what they would turn on is not
    here)."""
    return field(default=default, metadata={"help": help, "compat": compat, "only": only, "why": why})


@dataclass
class EngineConfig:
    """The engine's options: ``LLM(model, **options)``, and the ``pagedllm serve`` / ``generate``
    flags (``--max-model-len`` for ``max_model_len``) follow from these fields, with their help."""

    model: str = field(metadata={"help": "local directory, or hub id (downloaded into the HF cache if missing)"})
    tokenizer: str | None = option(None, "the tokenizer's directory or hub id (default: the model's)")
    revision: str | None = option(None, "the model's hub revision: a branch, tag or commit")
    tokenizer_revision: str | None = option(None, "the tokenizer's hub revision (default: the model's)")
    tokenizer_mode: str = option("auto", "auto (the fast tokenizer where there is one) or slow")
    trust_remote_code: bool = option(False, "let transformers run a checkpoint's own code for its config and "
                                            "tokenizer (the model itself is always pagedllm's)")
    download_dir: str | None = option(None, "where hub downloads go (default: the HF cache, HF_HOME)")
    hf_token: bool | str | None = option(None, "the hub token for a private or gated model: the token, True (the "
                                               "one `hf auth login` saved), or None (HF_TOKEN's, else the saved one)")
    skip_tokenizer_init: bool = option(False, "load no tokenizer: prompts are token ids, outputs carry no text")
    hf_overrides: dict | None = option(None, "config.json values to override, e.g. {\"max_position_embeddings\": 4096}")
    dtype: str | torch.dtype = option("auto", "auto (the checkpoint's; float32 runs as float16 on a GPU), float16, "
                                              "bfloat16 or float32")
    load_format: str = option("auto", "auto (safetensors, else bin), safetensors, pt, or dummy (random weights)")
    quantization: str | None = option(None, "fp8: linear weights in FP8 (quantized at load), activations "
                                              "per token; an FP8 checkpoint sets it itself")
    kv_cache_dtype: str = option("auto", "the KV cache's dtype: auto (the model's), or fp8 (e4m3: twice the tokens)")
    task: str = option("auto", "auto or generate: pagedllm generates text")
    generation_config: str = option("auto", "where generate() takes its default sampling settings from when given "
                                            "none: auto (the model's generation_config.json), vllm (pagedllm's "
                                            "own), or a directory holding a generation_config.json")
    seed: int | None = option(0, "seeds sampling of requests without a seed of their own, and dummy weights; "
                                 "None: fresh noise each run")
    device: str = option("auto", "cuda if there is one, else cpu; or cuda, cuda:N, cpu")
    gpu_memory_utilization: float = option(0.9, "share of GPU memory for weights, activations and the KV cache")
    num_kv_blocks: int | None = option(None, "fix the KV cache's size in blocks instead of profiling it")
    block_size: int = option(16, "tokens per KV block (a power of two)")
    max_model_len: int | None = option(None, "longest prompt + completion (default: the model's)")
    max_num_seqs: int | None = option(None, f"most requests in one batch (default {LARGE_GPU_BATCH[0]} on a GPU of "
                                            f"70 GiB or more other than an A100, as vLLM's; else {BATCH[0]})")
    max_num_batched_tokens: int | None = option(
        None, f"token budget per step (default {LARGE_GPU_BATCH[1]} on such a GPU, else and in the server "
              f"{SERVER_MAX_NUM_BATCHED_TOKENS}); longer prompts prefill in chunks")
    max_logprobs: int = option(20, "the most logprobs / prompt_logprobs a request may ask for (-1: no limit)")
    max_num_samples: int = option(4096, "the most sequences one request may draw (n, or best_of where larger)")
    enforce_eager: bool = option(False, "skip capturing decode CUDA graphs")
    tensor_parallel_size: int = option(1, "GPUs (or CPU processes) the model is split over")
    data_parallel_size: int = option(1, "engine replicas, each on tensor_parallel_size GPUs of its own (or a CPU "
                                        "process), sharing the requests")
    disable_custom_all_reduce: bool = option(
        True, "False: tensor parallelism all-reduces small messages (decode) through a symmetric-memory kernel, "
              "NCCL beyond; faster, but a worker that dies mid-step leaves the others' GPUs waiting forever")
    enable_prefix_caching: bool | None = option(True, "reuse the KV blocks of prompts' shared prefixes (None, "
                                                      "vLLM's default, is True)")
    async_scheduling: bool = option(True, "schedule the next step while the device runs this one")
    stream_interval: int = option(1, "a streamed request is reported at its first token, then every N tokens and "
                                     "at its end: fewer, larger chunks for a server whose HTTP side is busy")

    # Accepted so that vLLM scripts run unchanged; each says what it does here.
    num_gpu_blocks_override: int | None = option(None, "vLLM's name for num_kv_blocks",
                                                 compat="the same as num_kv_blocks")
    enable_chunked_prefill: bool | None = option(
        None, "vLLM's switch for chunked prefill", compat="prefill is always chunked under max_num_batched_tokens "
                                                          "here; outputs are the same either way")
    swap_space: float = option(4, "vLLM's host memory for swapped-out requests (GiB)",
                               compat="preempted requests are recomputed here, never swapped to host memory")
    cpu_offload_gb: float = option(0, "vLLM's weight offloading to host memory (GiB)",
                                   compat="weights stay on the device here: the model must fit there")
    disable_log_stats: bool = option(False, "vLLM's switch for periodic stats logs",
                                     compat="pagedllm logs no periodic stats (the server has /metrics)")
    max_seq_len_to_capture: int = option(8192, "vLLM's longest context run in CUDA graphs",
                                         compat="decode CUDA graphs serve every context length here")
    distributed_executor_backend: str | None = option(
        None, "vLLM's choice of how tensor-parallel workers run: mp, ray or uni",
        compat="tensor-parallel workers are processes of this host here, as vLLM's 'mp' (pagedllm.ray runs whole "
               "replicas on Ray)",
        only=(None, "mp", "ray", "uni"), why="workers here are always processes of this host")
    compilation_config: int | dict | None = option(
        None, "vLLM's torch.compile level or settings", compat="nothing is compiled with torch.compile here: decode "
                                                             "steps replay CUDA graphs unless enforce_eager")
    max_parallel_loading_workers: int | None = option(
        None, "vLLM's parallel loading of weight files", compat="weight files load one after another here")
    mm_processor_cache_gb: float = option(4, "vLLM's cache of processed multi-modal inputs (GiB)",
                                          compat="prompts are text here: there is nothing to cache")
    # Accepted at vLLM's defaults (or the values listed) only: what others would turn on is not here, and says so.
    runner: str = option("auto", "vLLM's model runner: auto or generate", only=("auto", "generate"),
                         why="pagedllm generates text (pooling is not supported)")
    enable_lora: bool = option(False, "vLLM's switch for LoRA adapters (not supported: False only)", only=(False,),
                               why="LoRA adapters are not supported (merge the adapter into the weights, as peft's "
                                   "merge_and_unload does, and load that)")
    pipeline_parallel_size: int = option(1, "vLLM's pipeline stages (not supported: 1 only)", only=(1,),
                                         why="pipeline parallelism is not supported (tensor_parallel_size splits a "
                                             "model over one host's GPUs)")
    speculative_config: dict | None = option(None, "vLLM's speculative decoding (not supported: None only)",
                                             only=(None,), why="speculative decoding is not supported")
    enable_sleep_mode: bool = option(False, "vLLM's sleep mode (not supported: False only)", only=(False,),
                                     why="sleep mode is not supported (LLM.sleep and wake_up are not here)")
    enable_expert_parallel: bool = option(False, "vLLM's expert parallelism for MoE (not supported: False only)",
                                          only=(False,), why="experts are split by tensor parallelism here")
    disable_sliding_window: bool = option(False, "vLLM's switch to run sliding-window layers as full attention "
                                                 "(False only)", only=(False,),
                                          why="sliding-window layers always attend within their window here")
    calculate_kv_scales: bool = option(False, "vLLM's FP8 KV scales computed from the first batch (False only)",
                                       only=(False,), why="an FP8 KV cache takes the checkpoint's scales, else 1.0")
    scheduling_policy: str = option("fcfs", "vLLM's scheduling policy: fcfs", only=("fcfs",),
                                    why="requests are served first come, first served (priority scheduling is not "
                                        "supported)")
    logprobs_mode: str = option("raw_logprobs", "what logprobs hold: raw_logprobs (of the model's logits, before "
                                                "temperature, penalties and top-k/p, as vLLM's default)",
                                only=("raw_logprobs",), why="logprobs are of the model's raw logits here")
    model_impl: str = option("auto", "vLLM's choice of model code: auto or vllm (pagedllm's own)",
                             only=("auto", "vllm"), why="the model always runs pagedllm's own code")
    config_format: str = option("auto", "vLLM's config format: auto or hf", only=("auto", "hf"),
                                why="config.json is read as Hugging Face's")
    code_revision: str | None = option(None, "vLLM's revision of a hub model's remote code (None only)",
                                       only=(None,), why="a checkpoint's remote code is used for its config and "
                                                         "tokenizer only, at the model's revision")
    reasoning_parser: str | None = option(None, "a reasoning model's thinking: deepseek_r1 or qwen3 (between "
                                                "<think> and </think>: DeepSeek-R1, Qwen3, QwQ), openai_gptoss "
                                                "(gpt-oss's harmony, its own without a flag); vLLM's names. The "
                                                "server puts it in each chat answer's 'reasoning' apart from its "
                                                "'content', and structured outputs constrain only the answer")
    structured_outputs_config: dict | None = option(
        None, "vLLM's structured-output settings: {\"backend\": \"auto\" or \"xgrammar\"}",
        only=(None, {"backend": "auto"}, {"backend": "xgrammar"}), why="structured outputs run on xgrammar here")

    model_path: str = field(init=False)
    hf_config: PretrainedConfig = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._check_types()
        self._accept_vllm_only_options()
        _require(self.block_size >= 1 and self.block_size & (self.block_size - 1) == 0,
                 "block_size", self.block_size, "a power of two")
        _require(self.stream_interval >= 1, "stream_interval", self.stream_interval, ">= 1")
        _require(0 < self.gpu_memory_utilization <= 1,
                 "gpu_memory_utilization", self.gpu_memory_utilization, "in (0, 1]")
        _require(self.num_kv_blocks is None or self.num_kv_blocks >= 1,
                 "num_kv_blocks", self.num_kv_blocks, ">= 1 or None")
        _require(self.load_format in LOAD_FORMATS, "load_format", self.load_format, f"one of {LOAD_FORMATS}")
        _require(self.max_logprobs >= -1, "max_logprobs", self.max_logprobs, ">= 0, or -1 (no limit)")
        _require(self.max_num_samples >= 1, "max_num_samples", self.max_num_samples, ">= 1")
        _require(self.seed is None or (isinstance(self.seed, int) and -2**63 <= self.seed < 2**64), "seed", self.seed,
                 "an int in [-2**63, 2**64) or None (what torch's generators take)")
        _require(self.tokenizer_mode in ("auto", "slow"), "tokenizer_mode", self.tokenizer_mode, "'auto' or 'slow'")
        _require(self.quantization in (None, "fp8"), "quantization", self.quantization,
                 "None or 'fp8' (FP8 weights, activations quantized per token; other methods are not supported)")
        _require(self.reasoning_parser in (None, *REASONING_PARSERS), "reasoning_parser", self.reasoning_parser,
                 f"one of {REASONING_PARSERS}")
        _require(self.kv_cache_dtype in ("auto", "fp8", "fp8_e4m3"), "kv_cache_dtype", self.kv_cache_dtype,
                 "'auto' (the model's dtype), or 'fp8' / 'fp8_e4m3' (e4m3; 'fp8_e5m2' is not supported)")
        _require(self.task in ("auto", "generate"), "task", self.task, "'auto' or 'generate': pagedllm generates text")
        _require(self.hf_overrides is None or isinstance(self.hf_overrides, dict), "hf_overrides", self.hf_overrides,
                 "a dict of config.json values")
        _require(self.tensor_parallel_size >= 1, "tensor_parallel_size", self.tensor_parallel_size, ">= 1")
        _require(self.data_parallel_size >= 1, "data_parallel_size", self.data_parallel_size, ">= 1")
        self.device = _resolve_device(self.device)
        if self.max_num_seqs is None or self.max_num_batched_tokens is None:
            seqs, tokens = _batch_defaults(self.device)
            self.max_num_seqs = seqs if self.max_num_seqs is None else self.max_num_seqs
            self.max_num_batched_tokens = tokens if self.max_num_batched_tokens is None else self.max_num_batched_tokens
        # (upper bounds: the engine's buffers are sized by them, and past int64 torch could not even say so)
        _require(1 <= self.max_num_seqs <= MAX_BATCH, "max_num_seqs", self.max_num_seqs, f"between 1 and {MAX_BATCH:,}")
        _require(1 <= self.max_num_batched_tokens <= MAX_BATCH_TOKENS, "max_num_batched_tokens",
                 self.max_num_batched_tokens, f"between 1 and {MAX_BATCH_TOKENS:,}")
        gpus_needed = self.tensor_parallel_size * self.data_parallel_size
        if gpus_needed > 1 and self.device.startswith("cuda"):
            gpus = torch.cuda.device_count()
            _require(self.device == "cuda" and gpus_needed <= gpus, "tensor_parallel_size",
                     self.tensor_parallel_size, f"such that tensor_parallel_size x data_parallel_size "
                     f"({gpus_needed}) is at most the {gpus} GPUs torch sees, with device='cuda' (rank r runs on "
                     f"GPU r), not {self.device!r}")

        self.model_path = resolve_model_path(self.model, self.revision, self.download_dir, token=self.hf_token)
        self.hf_config = load_hf_config(self.model_path, self.trust_remote_code)
        for key, value in (self.hf_overrides or {}).items():
            try:
                setattr(self.hf_config, key, value)
            except Exception as err:  # transformers' configs check their fields (huggingface_hub's strict dataclasses)
                raise ValueError(f"hf_overrides {key}={value!r} is invalid: {' '.join(str(err).split())}") from None
        get_model_class(self.hf_config)  # unknown architectures fail here, before loading
        _check_model_sizes(self.hf_config)
        if fp8_checkpoint(self.hf_config):  # an FP8 checkpoint runs in FP8 (as vLLM reads its quantization_config)
            self.quantization = "fp8"
        _check_tensor_parallel(self.hf_config, self.tensor_parallel_size)
        if self.tokenizer is None and self.tokenizer_revision in (None, self.revision):
            self.tokenizer = self.model_path
        elif not self.skip_tokenizer_init:  # another tokenizer, or the model's at another revision
            self.tokenizer = resolve_model_path(self.tokenizer or self.model, self.tokenizer_revision or self.revision,
                                                self.download_dir, weights=False, token=self.hf_token)
        self.dtype = _resolve_dtype(self.dtype, self.hf_config, self.device)

        model_max = derive_max_model_len(self.hf_config)
        if self.max_model_len is None:
            self.max_model_len = model_max
        _require(1 <= self.max_model_len <= model_max, "max_model_len", self.max_model_len,
                 f"between 1 and the model's maximum context length ({model_max})")

    def check_fp8_device(self, device: torch.device) -> None:
        """FP8 weights and an FP8 KV cache run through e4m3 kernels (``torch._scaled_mm``, Triton's
        fp8e4nv) that GPUs before Ada and Hopper do not have: say so before loading, not as a
        kernel's compile error mid-step. Called where the device is set up (CUDA is initialised
        there, after tensor-parallel workers are forked)."""
        asked = [f"{name}={value!r}" for name, value, fp8 in (
            ("quantization", self.quantization, self.quantization == "fp8"),
            ("kv_cache_dtype", self.kv_cache_dtype, self.kv_cache_dtype.startswith("fp8"))) if fp8]
        if device.type != "cuda" or not asked:
            return
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise ValueError(f"{' and '.join(asked)} need a GPU with FP8 (compute capability 8.9 or later: Ada, "
                             f"Hopper, Blackwell); {torch.cuda.get_device_name(device)} is {major}.{minor}: run "
                             f"the model in its dtype (an FP8 checkpoint cannot run here), or on the CPU")

    @property
    def kv_cache_torch_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn if self.kv_cache_dtype.startswith("fp8") else self.dtype

    def _check_types(self) -> None:
        """Each option has its field's type (a bool is no int; an int may stand for a float)."""
        for f in fields(self):
            if not f.init:
                continue
            value, kinds = getattr(self, f.name), getattr(f.type, "__args__", (f.type,))
            fits = any(value is None if kind is type(None) else is_real(value) if kind is float else
                       is_int(value) if kind is int else isinstance(value, kind) for kind in kinds)
            if not fits:
                names = " or ".join("None" if k is type(None) else k.__name__ for k in kinds)
                raise ValueError(f"{f.name}={value!r} is invalid: it must be {names}")

    def _accept_vllm_only_options(self) -> None:
        """Refuse what vLLM-only options would turn on that is not here; say what each other one a
        script set does here."""
        for f in fields(self):
            if (only := f.metadata.get("only")) is not None:
                value = getattr(self, f.name)
                _require(value in only, f.name, value, f"{' or '.join(map(repr, only))}: {f.metadata['why']}")
        if self.enable_prefix_caching is None:  # vLLM's default: on
            self.enable_prefix_caching = True
        for name in ("swap_space", "cpu_offload_gb", "mm_processor_cache_gb"):  # vLLM refuses these below 0 too
            _require(0 <= getattr(self, name) < math.inf, name, getattr(self, name), "a finite number >= 0 (GiB)")
        _require(self.max_parallel_loading_workers is None or self.max_parallel_loading_workers >= 1,
                 "max_parallel_loading_workers", self.max_parallel_loading_workers, ">= 1 or None")
        _require(self.max_seq_len_to_capture >= 1, "max_seq_len_to_capture", self.max_seq_len_to_capture, ">= 1")
        for f in fields(self):
            compat = f.metadata.get("compat")
            if compat and getattr(self, f.name) != f.default:
                log = logger.warning if f.name == "cpu_offload_gb" else logger.info
                log("%s=%r: %s", f.name, getattr(self, f.name), compat)
        if self.num_gpu_blocks_override is not None:
            _require(self.num_kv_blocks in (None, self.num_gpu_blocks_override), "num_gpu_blocks_override",
                     self.num_gpu_blocks_override, f"num_kv_blocks ({self.num_kv_blocks}) when both are set")
            self.num_kv_blocks = self.num_gpu_blocks_override


def derive_max_model_len(hf_config: PretrainedConfig) -> int:
    """The longest context the model's position scheme covers."""
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(hf_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError("config.json gives no maximum context length (max_position_embeddings or n_positions)")


_ABSENT = object()


def _check_model_sizes(hf_config: PretrainedConfig) -> None:
    """The model's sizes in config.json (or hf_overrides) are ints >= 1: num_hidden_layers=-1 failed
    as "layers with different KV head shapes set()", hidden_size=0 deep in building the model."""
    for name in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size"):
        value = getattr(hf_config, name, _ABSENT)
        if value is not _ABSENT and not (is_int(value) and value >= 1):
            raise ValueError(f"{name}={value!r} in config.json (or hf_overrides) is invalid: it must be an int >= 1")


def _check_tensor_parallel(hf_config: PretrainedConfig, tp_size: int) -> None:
    """Each rank needs whole query heads and an even share of the MLP; KV heads are split, or each
    shared by several ranks when there are fewer of them than ranks."""
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    mlp = next((v for k in ("intermediate_size", "ffn_dim", "n_inner") if (v := getattr(hf_config, k, None))),
               4 * hf_config.hidden_size)
    experts = getattr(hf_config, "moe_intermediate_size", None) or mlp  # each expert's width is split too
    for what, count in (("attention heads", heads), ("MLP width", mlp), ("expert MLP width", experts)):
        if count % tp_size:
            raise ValueError(f"tensor_parallel_size={tp_size} is invalid for this model: its {count} {what} "
                             f"do not split evenly over {tp_size} ranks")
    if kv_heads % tp_size and tp_size % kv_heads:
        raise ValueError(f"tensor_parallel_size={tp_size} is invalid for this model: its {kv_heads} KV heads "
                         f"neither split over {tp_size} ranks nor divide them")


def _resolve_device(device: str) -> str:
    """Counted through NVML: ``torch.cuda.is_available()`` would initialise CUDA in this process,
    and tensor-parallel workers could then not be forked."""
    if device == "auto":
        return "cuda" if torch.cuda.device_count() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:  # 'cuda:x', 'cuda:-1', ' cuda'
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r} is not supported: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    gpus = torch.cuda.device_count() if parsed.type == "cuda" else 0
    if parsed.type == "cuda" and not gpus:
        raise ValueError(f"device={device!r} was asked for, but torch sees no CUDA GPU; use device='cpu'")
    if parsed.type == "cuda" and (parsed.index or 0) >= gpus:  # else CUDA's "invalid device ordinal" mid-load
        raise ValueError(f"device={device!r} is invalid: torch sees {gpus} CUDA GPU(s), cuda:0 to cuda:{gpus - 1}")
    return device


def _batch_defaults(device: str) -> tuple[int, int]:
    """vLLM's batch defaults for this device: the large ones on a GPU of >= 70 GiB other than an A100
    (where vLLM measured larger steps to cost throughput). Anything unknown gets the small ones."""
    if not device.startswith("cuda"):
        return BATCH
    try:
        total, name = gpu_memory_and_name(torch.device(device).index or 0)
    except (OSError, RuntimeError, AttributeError) as error:  # no NVML: as vLLM, the small defaults
        logger.debug("GPU memory unknown (%s): max_num_seqs and max_num_batched_tokens default to %s", error, BATCH)
        return BATCH
    return LARGE_GPU_BATCH if total >= 70 << 30 and "a100" not in name.lower() else BATCH


def gpu_memory_and_name(index: int) -> tuple[int, str]:
    """A GPU's total memory in bytes and its name, through NVML as torch counts GPUs (``index`` as
    CUDA numbers it, after CUDA_VISIBLE_DEVICES): asking CUDA would initialise it in this process."""
    physical, nvml = torch.cuda._get_nvml_device_index(index), ctypes.CDLL("libnvidia-ml.so.1")
    handle, memory, name = ctypes.c_void_p(), (ctypes.c_ulonglong * 3)(), ctypes.create_string_buffer(96)
    for call, args in ((nvml.nvmlInit_v2, ()), (nvml.nvmlDeviceGetHandleByIndex_v2, (physical, ctypes.byref(handle))),
                       (nvml.nvmlDeviceGetMemoryInfo, (handle, memory)),  # nvmlMemory_t: total, free, used
                       (nvml.nvmlDeviceGetName, (handle, name, len(name)))):
        if (status := call(*args)) != 0:
            raise OSError(f"NVML's {call.__name__} failed with status {status}")
    return memory[0], name.value.decode()


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
