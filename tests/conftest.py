import logging
import os

import pytest
import torch

# Without a GPU, Triton kernels run under the interpreter; this must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pagedllm.testing import build_tiny_checkpoint, build_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def harmony_tokenizer():
    """The tiny BPE tokenizer with gpt-oss's harmony tokens as special tokens."""
    from pagedllm.reasoning import HARMONY_TOKENS

    tokenizer = build_tokenizer(vocab_size=504)
    tokenizer.add_special_tokens({"additional_special_tokens": list(HARMONY_TOKENS)})
    return tokenizer


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer):
    """``tiny_checkpoint(kind)``: the directory of a tiny random checkpoint, built once per session."""
    built: dict[str, str] = {}

    def get(kind: str) -> str:
        if kind not in built:
            built[kind] = build_tiny_checkpoint(kind, str(tmp_path_factory.mktemp(kind)), tokenizer=tokenizer)
        return built[kind]

    return get


def hf_model(kind: str, path: str):
    """HF's model of a tiny checkpoint in float32, Gemma 2's with eager attention: the SDPA path (its
    default in some transformers versions, 5.17's) leaves out the score soft-cap the model defines."""
    from transformers import AutoModelForCausalLM

    eager = {"attn_implementation": "eager"} if kind == "gemma2" else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **eager)


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """HF transformers' greedy continuation of one unpadded prompt, ignoring EOS."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def random_prompts(lengths: list[int], seed: int = 0, low: int = 3, high: int = 500) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, high, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture
def pagedllm_log():
    """The records the "pagedllm" logger emits at INFO and above during a test (its own handler
    does not propagate to pytest's)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("pagedllm")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def break_text_of(engine, which, error: Exception, monkeypatch) -> None:
    """Make the engine's text step raise ``error`` for the requests ``which(request)`` picks: an
    error pinned on those requests alone."""
    extend_text = engine._extend_text

    def broken(request):
        if which(request):
            raise error
        return extend_text(request)

    monkeypatch.setattr(engine, "_extend_text", broken)
