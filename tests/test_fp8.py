"""FP8: linear weights quantized per row at load (``quantization="fp8"``) or read from FP8
checkpoints (compressed-tensors per channel, ``fp8`` per tensor and in blocks), activations per
token. On the CPU the reference runs (dequantize, multiply); on CUDA ``torch._scaled_mm``."""

import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagedllm import LLM, SamplingParams
from pagedllm.layers.quantization import FP8, fp8_linear
from pagedllm.models.fp8_checkpoint import DequantizedTensor
from pagedllm.testing import held_out_loss
from pagedllm_kernels.reference import quantize_rows_ref

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "pagedllm-demo")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_rows_quantize_within_fp8s_step():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 200, generator=g) * torch.logspace(-3, 2, 9).unsqueeze(1)  # rows of very different size
    q, scale = quantize_rows_ref(x)
    assert q.dtype == FP8 and scale.shape == (9, 1) and q.float().abs().max() <= 448
    error = (q.float() * scale - x).abs() / x.abs().amax(dim=1, keepdim=True)
    assert error.max() <= 2**-4  # e4m3: 3 mantissa bits, relative to each row's largest value


@pytest.mark.parametrize("block", [None, (32, 16)])
def test_a_dequantized_checkpoint_tensor_reads_the_same_from_any_slice(block):
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(100, 70, generator=g).to(FP8)
    shape = (1, 1) if block is None else (-(-100 // block[0]), -(-70 // block[1]))
    scale = torch.rand(*shape, generator=g) + 0.5
    whole = weight.float() * (scale if block is None else
                              scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:100, :70])
    t = DequantizedTensor(weight, scale, block)
    assert torch.equal(t[:], whole) and torch.equal(t[33:71], whole[33:71]) and torch.equal(t[:, 5:47], whole[:, 5:47])
    per_row = DequantizedTensor(weight, scale.flatten()[:1].repeat(100, 1) * torch.arange(1, 101).unsqueeze(1), None)
    assert torch.equal(per_row[10:20], weight[10:20].float() * per_row.scale[10:20])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with FP8 (Hopper)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 5, 16, 33])  # few_rows_matmul up to FEW_ROWS, torch._scaled_mm past it
def test_fp8_linear_equals_the_reference(dtype, rows):
    from pagedllm_kernels import fp8_ops

    g = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, 256, device="cuda", generator=g).to(dtype)
    weight, scale = quantize_rows_ref(torch.randn(96, 256, device="cuda", generator=g))
    bias = torch.randn(96, device="cuda", generator=g).to(dtype)
    got = fp8_linear(x, weight, scale, bias)
    # against the product of the activations as the kernel quantized them: its e4m3 rounding may
    # differ from torch's in a tie (its own test), and one activation a step apart moves its whole row
    x_q, x_scale = fp8_ops.quantize_rows(x)
    expected = ((x_q.float() * x_scale) @ (weight.float() * scale).t()).to(dtype) + bias
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2, atol=1e-2)


def text_loss(llm: LLM) -> float:
    """The demo model's loss on a page of Python it did not train on (this file)."""
    return held_out_loss(llm, os.path.abspath(__file__))


@pytest.fixture(scope="module")
def demo_loss():
    return text_loss(LLM(DEMO, device="cpu"))


def test_quantized_at_load_the_demo_model_keeps_its_loss(demo_loss):
    llm = LLM(DEMO, device="cpu", quantization="fp8")
    linear = llm.llm_engine.executor.runner.model.model.layers[0].self_attn.qkv_proj
    assert linear.weight.dtype == FP8 and linear.weight_scale.shape == (linear.weight.shape[0], 1)
    assert abs(text_loss(llm) - demo_loss) < 0.02 * demo_loss


def fp8_checkpoint(path: str, layout: str) -> str:
    """The demo model saved as an FP8 checkpoint: compressed-tensors per channel, or quant_method
    fp8 per tensor (with static input scales) or in 64 x 32 blocks."""
    shutil.copytree(DEMO, path)
    state = load_file(os.path.join(DEMO, "model.safetensors"))
    for name in [n for n in state if n.split(".")[-2] in LINEARS]:
        weight = state.pop(name).float()
        if layout == "channel":
            q, scale = quantize_rows_ref(weight)
            state[name], state[f"{name}_scale"] = q, scale
        elif layout == "tensor":
            scale = weight.abs().max() / 448
            state[name], state[f"{name}_scale"] = (weight / scale).to(FP8), scale.reshape(())
            state[name.replace(".weight", ".input_scale")] = torch.tensor(0.05)
        else:
            blocks = weight.reshape(weight.shape[0] // 64, 64, weight.shape[1] // 32, 32)
            scale = blocks.abs().amax(dim=(1, 3)) / 448
            expanded = scale.repeat_interleave(64, 0).repeat_interleave(32, 1)
            state[name], state[f"{name}_scale_inv"] = (weight / expanded).to(FP8), scale
    save_file(state, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {
        "channel": {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                        "input_activations": {"num_bits": 8, "type": "float", "dynamic": True}}}},
        "tensor": {"quant_method": "fp8", "activation_scheme": "static"},
        "block": {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [64, 32]},
    }[layout]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


@pytest.mark.parametrize("layout", ["channel", "tensor", "block"])
def test_fp8_checkpoints_load_as_saved_and_keep_the_loss(layout, tmp_path, demo_loss):
    llm = LLM(fp8_checkpoint(str(tmp_path / layout), layout), device="cpu")
    assert llm.llm_engine.config.quantization == "fp8"  # read from the checkpoint's quantization_config
    assert abs(text_loss(llm) - demo_loss) < 0.03 * demo_loss


def test_fp8_checkpoints_split_over_two_ranks_as_over_one(tmp_path):
    """Each rank reads its slices of the 64 x 32 blocks and their scales. Not token for token: a
    row-parallel layer's rank quantizes its own columns (weights and activations, each row with the
    scale of its slice), so two ranks round differently from one, as in vLLM; the loss says whether
    the slices were read right (a misread block would move it by far more)."""
    path = fp8_checkpoint(str(tmp_path / "block"), "block")
    one = text_loss(LLM(path, device="cpu"))
    with LLM(path, device="cpu", tensor_parallel_size=2) as two:
        assert abs(text_loss(two) - one) < 0.005 * one


@pytest.mark.parametrize("quant_method", ["gptq", "awq", "bitsandbytes"])
def test_other_quantized_checkpoints_are_refused_by_name(quant_method, tmp_path):
    shutil.copytree(DEMO, tmp_path / "q")
    with open(tmp_path / "q" / "config.json") as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": quant_method, "bits": 4}
    with open(tmp_path / "q" / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match=f"quant_method='{quant_method}' is not supported"):
        LLM(str(tmp_path / "q"), device="cpu")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_an_fp8_kv_cache_keeps_the_demo_models_loss(backend, demo_loss, monkeypatch):
    """kv_cache_dtype="fp8": K/V stored in e4m3 (scale 1), through the reference or the Triton
    kernels (under the interpreter on the CPU, on the GPU where there is one)."""
    monkeypatch.setenv("PAGEDLLM_ATTENTION_BACKEND", backend)
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    llm = LLM(DEMO, device=device, kv_cache_dtype="fp8", dtype="float32")
    assert llm.llm_engine.executor.runner.kv_cache.dtype == torch.float8_e4m3fn
    assert abs(text_loss(llm) - demo_loss) < 0.01 * demo_loss


def test_an_fp8_checkpoints_calibrated_kv_scales_are_used(tmp_path, demo_loss):
    """llm-compressor's kv_cache_scheme saves each layer's ``self_attn.k_scale``/``v_scale``: an FP8
    KV cache divides by them (without an FP8 cache they are ignored, as in vLLM)."""
    path = fp8_checkpoint(str(tmp_path / "kv"), "channel")
    state = load_file(os.path.join(path, "model.safetensors"))
    for layer in range(4):
        state[f"model.layers.{layer}.self_attn.k_scale"] = torch.tensor(0.1)
        state[f"model.layers.{layer}.self_attn.v_scale"] = torch.tensor([0.05])
    save_file(state, os.path.join(path, "model.safetensors"))
    attention = lambda llm: llm.llm_engine.executor.runner.model.model.layers[3].self_attn.attn  # noqa: E731
    llm = LLM(path, device="cpu", kv_cache_dtype="fp8")
    assert (attention(llm).k_scale, attention(llm).v_scale) == pytest.approx((0.1, 0.05))
    assert abs(text_loss(llm) - demo_loss) < 0.03 * demo_loss
    assert attention(LLM(path, device="cpu")).k_scale == 1.0


@pytest.mark.parametrize("bad", [0.0, -0.1, math.inf, math.nan])
def test_an_fp8_checkpoints_kv_scale_that_is_not_positive_and_finite_is_refused_by_name(bad, tmp_path):
    path = fp8_checkpoint(str(tmp_path / "kv"), "channel")
    state = load_file(os.path.join(path, "model.safetensors"))
    for layer in range(4):
        state[f"model.layers.{layer}.self_attn.k_scale"] = torch.tensor(0.1)
        state[f"model.layers.{layer}.self_attn.v_scale"] = torch.tensor(bad if layer == 2 else 0.05)
    save_file(state, os.path.join(path, "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.2\.self_attn\.v_scale=.* is invalid: a KV cache scale"):
        LLM(path, device="cpu", kv_cache_dtype="fp8")
    LLM(path, device="cpu").shutdown()  # unused without an FP8 cache, as vLLM ignores it


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_an_fp8_kv_cache_holds_twice_the_blocks():
    blocks = {}
    for kv_cache_dtype in ("auto", "fp8"):
        llm = LLM(DEMO, kv_cache_dtype=kv_cache_dtype, dtype="bfloat16", gpu_memory_utilization=0.3)
        blocks[kv_cache_dtype] = llm.llm_engine.block_manager.num_blocks
        llm.llm_engine.shutdown()
    assert blocks["fp8"] > 1.9 * blocks["auto"]


def test_experts_are_quantized_too_and_keep_the_outputs_close(tiny_checkpoint):
    """quantization="fp8" on a mixture of experts: every expert's weights in FP8 with row scales,
    read by the MoE kernel (its reference on the CPU); the prompt's logprobs stay within a few
    percent (a tiny random model's large logits magnify FP8's rounding: the dense qwen3 moves as much)."""
    path = tiny_checkpoint("qwen3-moe")
    prompt = list(range(3, 60))
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    base, fp8 = (LLM(path, device="cpu", quantization=q) for q in (None, "fp8"))
    block = fp8.llm_engine.executor.runner.model.model.layers[0].mlp
    assert block.w13.dtype == block.w2.dtype == FP8 and block.w13_scale.shape == (*block.w13.shape[:2], 1)
    logprobs = [[entry[t].logprob for t, entry in zip(prompt[1:], llm.generate([prompt], params, use_tqdm=False)[0]
                                                     .prompt_logprobs[1:], strict=True)] for llm in (base, fp8)]
    change = sum(abs(a - b) for a, b in zip(*logprobs, strict=True)) / len(prompt[1:])
    assert change < 0.05 * sum(abs(a) for a in logprobs[0]) / len(prompt[1:])


def assert_same_fp8(q: torch.Tensor, expected_q: torch.Tensor) -> None:
    """Equal e4m3 values, but for the interpreter's own e4m3 rounding on the CPU: triton's (3.6)
    makes the exponent one too small where rounding carries into the next power of two (124.3 ->
    64, not 128) and rounds ties away from even (168 -> 176); GPUs convert in hardware, round to
    nearest even, as torch."""
    got, expected = q.cpu().float(), expected_q.cpu().float()
    wrong = got != expected
    if q.device.type == "cpu":
        carried = (expected.abs().log2() == expected.abs().log2().round()) & (got == expected / 2)
        next_to = (got - expected).abs() <= (expected.abs() / 8).clamp(min=2**-9)  # one e4m3 step (subnormal: 2**-9)
        wrong &= ~(carried | next_to)
    assert not wrong.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("width", [5, 1000, 2500, 17000])  # one block (up to 16384), or several
def test_the_row_quantizing_kernel_equals_quantize_rows_ref(dtype, width):
    from pagedllm_kernels import fp8_ops

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(width)
    x = (torch.randn(7, width, generator=g) * torch.logspace(-2, 2, 7).unsqueeze(1)).to(dtype)
    x[3] = 0  # an all-zero row keeps a tiny scale, not a division by zero
    q, scale = fp8_ops.quantize_rows(x.to(device))
    expected_q, expected_scale = quantize_rows_ref(x)
    assert torch.equal(scale.cpu(), expected_scale)
    assert_same_fp8(q, expected_q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + [torch.bfloat16] * torch.cuda.is_available())
@pytest.mark.parametrize("width", [96, 3000])
def test_norm_and_activation_kernels_quantize_what_they_make_as_quantize_rows_ref(dtype, width):
    """rms_norm and silu_and_mul with ``quantize``: their own output (unquantized) as
    quantize_rows_ref quantizes it, in the same kernel, within a rounding of the dtype (a row
    quantized runs in more warps, which sum the norm's squares in another order); and the
    references say the same."""
    from pagedllm_kernels.elementwise import rms_norm, silu_and_mul
    from pagedllm_kernels.reference import rms_norm_ref, silu_and_mul_ref

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(width)
    x, residual = ((torch.randn(5, width, generator=g) * torch.logspace(-2, 2, 5).unsqueeze(1)).to(dtype).to(device)
                   for _ in range(2))
    weight = torch.randn(width, generator=g).to(dtype).to(device)
    gate_up = torch.randn(5, 2 * width, generator=g).to(dtype).to(device)
    rounding = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    (q_res, scale_res), new_residual = rms_norm(x, weight, 1e-5, residual, quantize=True)
    assert torch.equal(new_residual, rms_norm(x, weight, 1e-5, residual)[1])
    # (the references quantize on the CPU: torch on CUDA divides by a Python number as a product by its inverse)
    for made, (q, scale) in [(rms_norm(x, weight, 1e-5), rms_norm(x, weight, 1e-5, quantize=True)),
                             (rms_norm(x, weight, 1e-5, residual)[0], (q_res, scale_res)),
                             (silu_and_mul(gate_up), silu_and_mul(gate_up, quantize=True))]:
        expected_q, expected_scale = quantize_rows_ref(made.cpu())
        assert q.dtype == FP8
        torch.testing.assert_close(scale.cpu(), expected_scale, rtol=rounding, atol=0)
        if device == "cpu":  # the interpreter sums in one order whatever the warps: the same values
            assert_same_fp8(q, expected_q)
        else:  # each value within one e4m3 step (1/16 of its row's largest, at most) of the dtype's output
            step = made.cpu().float().abs().amax(dim=1, keepdim=True) / 16
            assert ((q.cpu().float() * scale.cpu() - made.cpu().float()).abs() <= step * (1 + rounding)).all()
    x, weight, gate_up = x.cpu(), weight.cpu(), gate_up.cpu()
    for got, expected in [(rms_norm_ref(x, weight, 1e-5, quantize=True),
                           quantize_rows_ref(rms_norm_ref(x, weight, 1e-5))),
                          (silu_and_mul_ref(gate_up, True), quantize_rows_ref(silu_and_mul_ref(gate_up)))]:
        assert all(torch.equal(a.float(), b.float()) for a, b in zip(got, expected, strict=True))


def test_an_activation_too_wide_for_one_program_is_quantized_after():
    from pagedllm_kernels.elementwise import silu_and_mul

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gate_up = torch.randn(2, 2 * 17000, generator=torch.Generator().manual_seed(0)).to(device)
    q, scale = silu_and_mul(gate_up, quantize=True)
    expected_q, expected_scale = quantize_rows_ref(silu_and_mul(gate_up).cpu())
    assert torch.equal(scale.cpu(), expected_scale)
    assert_same_fp8(q, expected_q)


def test_norms_hand_fp8_activations_to_the_linear_layers_they_feed():
    """A quantized Llama's norms before q/k/v and gate/up, and its MLP activation, quantize their own
    outputs (the final norm, read by the bf16 LM head, does not); the model computes what it did
    with a quantizing kernel before each layer: the same logprobs."""
    from pagedllm.models import llama

    llm = LLM(DEMO, device="cpu", quantization="fp8")
    model = llm.llm_engine.executor.runner.model.model
    assert all(layer.input_layernorm.fp8_out and layer.post_attention_layernorm.fp8_out for layer in model.layers)
    assert not model.norm.fp8_out
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=3)
    prompts = ["def main():", "import numpy as np\n"]
    fused = llm.generate(prompts, params, use_tqdm=False)
    for layer in model.layers:
        layer.input_layernorm.fp8_out = layer.post_attention_layernorm.fp8_out = False
    original = llama.LlamaMLP.forward
    llama.LlamaMLP.forward = lambda self, x: self.down_proj(
        llama.silu_and_mul_ref(self.gate_up_proj(x)))  # the activation unquantized: fp8_linear quantizes it
    try:
        unfused = llm.generate(prompts, params, use_tqdm=False)
    finally:
        llama.LlamaMLP.forward = original
    for a, b in zip(fused, unfused, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert [{t: p.logprob for t, p in e.items()} for e in a.outputs[0].logprobs] == \
            [{t: p.logprob for t, p in e.items()} for e in b.outputs[0].logprobs]


@pytest.mark.parametrize("args, named", [
    ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype='fp8'"), ({"quantization": "fp8"}, "quantization='fp8'"),
    ({"quantization": "fp8", "kv_cache_dtype": "fp8_e4m3"}, "quantization='fp8' and kv_cache_dtype='fp8_e4m3'"),
])
def test_fp8_on_a_gpu_without_it_is_refused_by_name(args, named, monkeypatch):
    """On an A100 (compute capability 8.0) Triton has no e4m3 and torch._scaled_mm no FP8: the
    options are refused where the device is set up, naming them and the GPU, not as a kernel's
    compile error in the first step. Ada (8.9) and Hopper pass; CPUs are not asked."""
    from pagedllm.config import EngineConfig

    config = EngineConfig(DEMO, device="cpu", **args)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    for capability, refused in (((8, 0), True), ((8, 6), True), ((8, 9), False), ((9, 0), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        if refused:
            with pytest.raises(ValueError, match=rf"^{named} need a GPU with FP8 .* A100-SXM4-80GB is {capability[0]}"):
                config.check_fp8_device(torch.device("cuda"))
        else:
            config.check_fp8_device(torch.device("cuda"))
    config.check_fp8_device(torch.device("cpu"))  # the CPU runs the references


def test_without_fp8_options_no_gpu_is_asked(monkeypatch):
    from pagedllm.config import EngineConfig

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: pytest.fail("asked"))
    EngineConfig(DEMO, device="cpu").check_fp8_device(torch.device("cuda"))
