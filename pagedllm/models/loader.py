"""Find a model's files, read its config, and stream its weights as HF saved them."""

import glob
import json
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig


def resolve_model_path(model: str, revision: str | None = None, download_dir: str | None = None,
                       weights: bool = True, token: bool | str | None = None) -> str:
    """A local directory as it is, else a hub id's snapshot in the HF cache, downloaded if missing
    (``weights=False``: a tokenizer's files only; ``token``: huggingface_hub's)."""
    if os.path.isdir(model):
        return os.path.abspath(model)
    if os.path.exists(model) or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise FileNotFoundError(f"model directory {model!r} does not exist")
    from pagedllm.models.download import download_model

    return download_model(model, revision, download_dir, weights, token)


# Image-and-text checkpoints whose language model runs alone here (prompts are text only).
TEXT_OF_MULTIMODAL = {"Gemma3ForConditionalGeneration"}


def load_hf_config(model_path: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """The checkpoint's config; for an image-and-text checkpoint of TEXT_OF_MULTIMODAL, its
    language model's (keeping the checkpoint's architecture and dtype)."""
    config_file = os.path.join(model_path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{model_path} has no config.json: it is not a Hugging Face model directory")
    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {config_file}: {err}") from None
    text = getattr(config, "text_config", None)
    if text is None or not TEXT_OF_MULTIMODAL & set(config.architectures or []):
        return config
    text.architectures = list(config.architectures)
    text.dtype = text.dtype or config.dtype
    return text


def weight_files(model_path: str, load_format: str) -> tuple[str, list[str]]:
    """The checkpoint's weight files and their format ('safetensors' or 'pt')."""
    formats = ["safetensors", "pt"] if load_format == "auto" else [load_format]
    for fmt in formats:
        pattern, index_name = {
            "safetensors": ("*.safetensors", "model.safetensors.index.json"),
            "pt": ("*.bin", "pytorch_model.bin.index.json"),
        }[fmt]
        index = os.path.join(model_path, index_name)
        if os.path.isfile(index):
            with open(index) as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
            files = [os.path.join(model_path, n) for n in names]
            missing = [f for f in files if not os.path.isfile(f)]
            if missing:
                raise FileNotFoundError(f"{index_name} names weight files that are missing: {missing}")
            return fmt, files
        files = sorted(glob.glob(os.path.join(model_path, pattern)))
        files = [f for f in files if not os.path.basename(f).startswith(("consolidated", "training_args"))]
        if files:
            return fmt, files
    wanted = " or ".join("*.safetensors" if f == "safetensors" else "*.bin" for f in formats)
    raise FileNotFoundError(
        f"no weight files ({wanted}) in {model_path}; use load_format='dummy' for random weights"
    )


class CheckpointTensor:
    """One checkpoint tensor, read only where it is indexed (``t[a:b]``, ``t[:, a:b]``, ``t[:]``): a
    tensor-parallel rank reads just its slices. ``reads`` counts the bytes read, per checkpoint;
    ``is_fp8``: stored as float8 e4m3 (an FP8 checkpoint's weight, to be read with its scale)."""

    def __init__(self, source, shape: tuple[int, ...], reads: list[int], is_fp8: bool):
        self._source, self.shape, self._reads, self.is_fp8 = source, tuple(shape), reads, is_fp8

    def __getitem__(self, index) -> torch.Tensor:
        tensor = self._source[index]
        self._reads[0] += tensor.numel() * tensor.element_size()
        return tensor


def iter_checkpoint(model_path: str, load_format: str,
                    reads: list[int] | None = None) -> Iterator[tuple[str, CheckpointTensor]]:
    """Every (name, tensor) of the checkpoint, one file at a time, unread until indexed;
    ``reads[0]`` grows by the bytes read."""
    fmt, files = weight_files(model_path, load_format)
    reads = reads if reads is not None else [0]
    for file in files:
        if fmt == "safetensors":
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    tensor = f.get_slice(name)
                    yield name, CheckpointTensor(tensor, tensor.get_shape(), reads, tensor.get_dtype() == "F8_E4M3")
        else:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            for name, tensor in state.items():
                yield name, CheckpointTensor(tensor, tensor.shape, reads, tensor.dtype == torch.float8_e4m3fn)
            del state
