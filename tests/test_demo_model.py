"""The bundled demo model: small, complete, equal in pagedllm and transformers, and it writes Python."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pagedllm import LLM, SamplingParams

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "pagedllm-demo")
PROMPTS = ["def fibonacci(n):", "class Stack:\n    def __init__(self):", "import os\n\n\n"]


@pytest.fixture(scope="module")
def llm():
    return LLM(DEMO, device="cpu")


def test_checkpoint_is_small_and_complete():
    files = set(os.listdir(DEMO))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= files
    assert sum(os.path.getsize(os.path.join(DEMO, f)) for f in files) < 20 * 2**20
    with open(os.path.join(DEMO, "training.json")) as f:
        training = json.load(f)
    assert training["log"][-1]["held_out_loss"] < 3.5  # it learned something (random: ln 4096 = 8.3)


def test_greedy_equals_transformers(llm):
    hf = AutoModelForCausalLM.from_pretrained(DEMO)
    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        ids = torch.tensor([tokenizer.encode(prompt)])
        expected = hf.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert output.outputs[0].token_ids == expected[0, ids.shape[1]:].tolist()


def test_it_writes_python(llm):
    text = llm.generate("def fibonacci(n):", SamplingParams(temperature=0, max_tokens=40),
                        use_tqdm=False)[0].outputs[0].text
    assert text.startswith("\n    ")  # an indented body
    assert any(word in text for word in ("return", "if ", "for ", "self", "=")), text


def test_stop_at_the_end_of_the_first_line(llm):
    out = llm.generate("import os\n", SamplingParams(temperature=0, max_tokens=60, stop=["\n"]),
                       use_tqdm=False)[0].outputs[0]
    assert "\n" not in out.text and (out.finish_reason, out.stop_reason) == ("stop", "\n")
