"""gpt-oss's MXFP4 checkpoints load as the weights they stand for: dequantized as HF transformers
dequantizes them, slice by slice, at one rank or two."""

import json
import os

import pytest
import torch
from conftest import hf_greedy, random_prompts
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from pagedllm import LLM, SamplingParams
from pagedllm.models.mxfp4_checkpoint import Mxfp4Tensor
from pagedllm.testing import build_tiny_checkpoint

MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def to_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[E, rows, cols]`` to MXFP4 blocks ``[E, rows, cols / 32, 16]`` and scales: each group of 32
    scaled by a power of two that brings its largest magnitude within 6, each value rounded to the
    nearest e2m1 magnitude, its sign in the nibble's top bit."""
    groups = w.float().reshape(*w.shape[:2], -1, 32)
    exponent = torch.ceil(torch.log2(groups.abs().amax(-1).clamp(min=1e-30) / 6.0)).clamp(-127, 127)
    scaled = groups / torch.ldexp(torch.ones_like(exponent), exponent.int())[..., None]
    nibble = (scaled.abs()[..., None] - MAGNITUDES).abs().argmin(-1) + 8 * (scaled < 0)
    return (nibble[..., 0::2] | nibble[..., 1::2] << 4).to(torch.uint8), (exponent + 127).to(torch.uint8)


def test_an_mxfp4_tensor_reads_as_transformers_dequantizes_it_from_any_slice():
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 40, 4, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(110, 140, (3, 40, 4), dtype=torch.uint8, generator=g)
    expected = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [3, 128, 40]
    tensor = Mxfp4Tensor(blocks, scales)
    assert tensor.shape == (3, 128, 40)
    torch.testing.assert_close(tensor[:], expected, rtol=0, atol=0)
    for index in [(slice(None), slice(20, 77)), (slice(None), slice(64, 128)), (slice(None), slice(None), slice(6, 30)),
                  (slice(None), slice(33, 40), slice(1, 39))]:
        torch.testing.assert_close(tensor[index], expected[index], rtol=0, atol=0)
    with pytest.raises(ValueError, match="do not match"):
        Mxfp4Tensor(blocks, scales[:, :, :3])


@pytest.fixture(scope="module")
def mxfp4_and_float_checkpoints(tmp_path_factory, tokenizer):
    """The tiny gpt-oss with its experts saved in MXFP4, and the same model saved in float32 with the
    experts as transformers dequantizes those blocks (HF's reference)."""
    dense = str(tmp_path_factory.mktemp("gpt-oss-dense"))
    hf = AutoModelForCausalLM.from_pretrained(build_tiny_checkpoint("gpt-oss", dense, tokenizer=tokenizer),
                                              dtype=torch.float32)
    state = {}
    for name, param in hf.named_parameters():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = to_mxfp4(param.data.transpose(1, 2))  # saved [E, rows, cols]
            param.data = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
            state[name + "_blocks"], state[name + "_scales"] = blocks, scales
        else:
            state[name] = param.data.clone()
    reference = str(tmp_path_factory.mktemp("gpt-oss-dequantized"))
    hf.save_pretrained(reference)
    tokenizer.save_pretrained(reference)
    quantized = str(tmp_path_factory.mktemp("gpt-oss-mxfp4"))
    save_file(state, os.path.join(quantized, "model.safetensors"))
    with open(os.path.join(reference, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    with open(os.path.join(quantized, "config.json"), "w") as f:
        json.dump(config, f)
    tokenizer.save_pretrained(quantized)
    return quantized, reference, hf


@pytest.mark.parametrize("tensor_parallel_size", [1, 2])
def test_mxfp4_checkpoint_gives_hf_greedy_output_of_its_dequantized_weights(tensor_parallel_size,
                                                                         mxfp4_and_float_checkpoints):
    quantized, _, hf = mxfp4_and_float_checkpoints
    prompts = random_prompts([3, 17, 40, 90])
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with LLM(quantized, device="cpu", dtype="float32", tensor_parallel_size=tensor_parallel_size) as llm:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [hf_greedy(hf, p, 12) for p in prompts]


def test_mxfp4_blocks_without_their_scales_are_named(mxfp4_and_float_checkpoints, tmp_path):
    quantized, _, _ = mxfp4_and_float_checkpoints
    from safetensors.torch import load_file

    state = load_file(os.path.join(quantized, "model.safetensors"))
    del state["model.layers.1.mlp.experts.down_proj_scales"]
    save_file(state, os.path.join(tmp_path, "model.safetensors"))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(quantized, name)) as src, open(os.path.join(tmp_path, name), "w") as dst:
            dst.write(src.read())
    with pytest.raises(ValueError, match="model.layers.1.mlp.experts.down_proj"):
        LLM(str(tmp_path), device="cpu", dtype="float32")
