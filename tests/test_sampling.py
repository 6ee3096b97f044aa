"""Each sampling parameter against a reference: fixed logits for the logit transforms and the
draw itself, HF transformers for repetition penalty and logprobs end to end."""

import pytest
import torch
from conftest import random_prompts
from transformers import AutoModelForCausalLM

from pagedllm import LLM, SamplingParams
from pagedllm.layers.sampler import (
    PenaltyInputs,
    Sampler,
    SamplingMetadata,
    SeededRows,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
)

LOGITS = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0, 0.0]])


def kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits[0]).nonzero().flatten().tolist()


def test_top_k_keeps_the_k_most_likely():
    assert kept(apply_top_k_top_p(LOGITS, torch.tensor([3]), None)) == [0, 1, 2]
    assert kept(apply_top_k_top_p(LOGITS, torch.tensor([0]), None)) == list(range(6))


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    probs = LOGITS.softmax(-1)[0]  # 0.574, 0.211, 0.128, 0.029, 0.004, 0.078
    assert kept(apply_top_k_top_p(LOGITS, None, torch.tensor([0.5]))) == [0]
    assert kept(apply_top_k_top_p(LOGITS, None, torch.tensor([0.8]))) == [0, 1, 2]  # 0.785 < 0.8 before token 2
    assert probs[:2].sum() < 0.8 < probs[[0, 1, 2]].sum()
    assert kept(apply_top_k_top_p(LOGITS, None, torch.tensor([1.0]))) == list(range(6))


def test_min_p_drops_tokens_below_a_share_of_the_most_likely():
    # token 1 has 0.368 of token 0's probability, token 2 0.223, token 5 0.135
    assert kept(apply_min_p(LOGITS, torch.tensor([0.3]))) == [0, 1]
    assert kept(apply_min_p(LOGITS, torch.tensor([0.2]))) == [0, 1, 2]
    assert kept(apply_min_p(LOGITS, torch.tensor([0.0]))) == list(range(6))


def test_penalties_change_logits_as_vllm_and_openai_define_them():
    penalties = PenaltyInputs(rows=torch.tensor([0]), presence=torch.tensor([0.5]), frequency=torch.tensor([0.25]),
                              repetition=torch.tensor([2.0]),
                              output_token_ids=torch.tensor([[1, 1, 3, -1]]),
                              seen_token_ids=torch.tensor([[4, 1, 1, 3]]))
    out = apply_penalties(LOGITS.clone(), penalties)[0].tolist()
    # repetition on seen tokens 1, 3, 4: positive / 2, negative * 2; then output counts 1: x2, 3: x1
    assert out == pytest.approx([2.0, 0.5 - 0.25 * 2 - 0.5, 0.5, -2.0 - 0.25 - 0.5, -6.0, 0.0])


@pytest.mark.parametrize("repetition", [3.4e307, 1e-300, 1e30, 1e-30])
def test_extreme_repetition_penalties_keep_a_token_possible(repetition):
    """Past float32's range a penalty would make a seen token -inf (or 0 / 0): where a grammar or
    allowed_token_ids leaves only seen tokens, nothing could be sampled. Finite logits stay finite,
    in the penalty's order; banned ones (-inf) stay banned."""
    logits = torch.tensor([[3.0, -2.0, float("-inf"), 0.0, 1.0]])
    penalties = PenaltyInputs(rows=torch.tensor([0]), presence=torch.zeros(1), frequency=torch.zeros(1),
                              repetition=torch.tensor([repetition]), output_token_ids=torch.tensor([[-1]]),
                              seen_token_ids=torch.tensor([[0, 1, 2, 3]]))
    out = apply_penalties(logits, penalties)[0]
    assert out[2] == float("-inf") and out[[0, 1, 3, 4]].isfinite().all()
    assert out[4] == 1.0  # not seen
    if repetition > 1:
        assert out[1] < out[3] <= out[0] < out[4]
    else:
        assert out[0] > out[4] and out[1] < out[3]


@pytest.mark.parametrize("temperature", [5.8e307, 3.5e38])
def test_a_temperature_past_float32s_range_samples_uniformly_among_allowed_tokens(temperature):
    """Such a temperature was inf in the step's float32 tensor, a banned token's -inf / inf a NaN,
    and argmax took it: token 0 every time, outside a grammar's mask (schemathesis: a 500, "no token
    could follow"). Now as uniform as any huge temperature, banned tokens still banned."""
    n = 6_000
    logits = LOGITS.repeat(n, 1)
    logits[:, 0] = float("-inf")  # banned (a grammar's mask, allowed_token_ids)
    temperatures = torch.tensor([temperature] * n, dtype=torch.float32)  # (as the step's inputs are made)
    meta = SamplingMetadata(temperatures=temperatures, top_ks=None, top_ps=None, all_greedy=False, seeded=None)
    tokens = Sampler(torch.Generator().manual_seed(0))(logits, meta).token_ids
    counts = torch.bincount(tokens, minlength=6)
    assert counts[0] == 0 and (counts[1:] > 0.8 * n / 5).all(), counts.tolist()


@pytest.mark.parametrize("max_num_logprobs", [None, 2])
def test_fused_greedy_step_equals_the_torch_one(monkeypatch, max_num_logprobs):
    """An all-greedy step takes its tokens and logprobs from one kernel (here under the interpreter):
    the same as the torch path's, top logprobs included."""
    from pagedllm.layers import triton_ops

    logits = (torch.randn(5, 3000, generator=torch.Generator().manual_seed(0)) * 4).half()
    logits[2, [7, 2000]] = 30.0  # a tie: the first wins
    logits = logits.to("cuda" if torch.cuda.is_available() else "cpu")
    meta = SamplingMetadata(torch.zeros(5), None, None, all_greedy=True, max_num_logprobs=max_num_logprobs)
    monkeypatch.setattr(triton_ops, "fused_on", lambda x: False)
    want = Sampler(torch.Generator(logits.device))(logits, meta)
    monkeypatch.setattr(triton_ops, "fused_on", lambda x: True)
    got = Sampler(torch.Generator(logits.device))(logits, meta)
    assert got.token_ids.tolist() == want.token_ids.tolist() and got.token_ids[2] == 7
    torch.testing.assert_close(got.sampled_logprobs, want.sampled_logprobs, atol=1e-4, rtol=1e-5)
    for field in ("top_ids", "top_logprobs", "sampled_ranks"):
        assert (getattr(got, field) is None) == (max_num_logprobs is None)
        if max_num_logprobs:
            torch.testing.assert_close(getattr(got, field), getattr(want, field))


@pytest.mark.parametrize("noise", ["sampler's generator", "seeds", "one seed at many positions"])
def test_temperature_sampling_follows_the_softmax(noise):
    """Chi-square goodness of fit over 40,000 draws (df 5; 20.5 is the 0.001 critical value), with
    the batch's noise and with seeded rows' own (Philox keyed by seed, counted by position)."""
    n, temperature = 40_000, 0.7
    logits = LOGITS.repeat(n, 1)
    rows = torch.arange(n)
    seeded = {"sampler's generator": None,
              "seeds": SeededRows(rows, rows * 7919 - 2**40, torch.zeros(n, dtype=torch.int64)),
              "one seed at many positions": SeededRows(rows, torch.full((n,), 5), rows)}[noise]
    meta = SamplingMetadata(temperatures=torch.full((n,), temperature), top_ks=None, top_ps=None,
                            all_greedy=False, seeded=seeded)
    tokens = Sampler(torch.Generator().manual_seed(0))(logits, meta).token_ids
    observed = torch.bincount(tokens, minlength=6).double()
    expected = (LOGITS[0] / temperature).softmax(-1).double() * n
    chi_square = ((observed - expected) ** 2 / expected).sum().item()
    assert chi_square < 20.5, (observed.tolist(), expected.tolist())


def test_greedy_with_repetition_penalty_matches_hf(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    hf = AutoModelForCausalLM.from_pretrained(path)
    llm = LLM(path, device="cpu")
    prompts = random_prompts([6, 40], seed=3)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, repetition_penalty=1.8)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs, strict=True):
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                               pad_token_id=0, repetition_penalty=1.8)[0, len(prompt):].tolist()
        assert output.outputs[0].token_ids == expected
    free = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    plain = llm.generate(prompts, free, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in plain] != [o.outputs[0].token_ids for o in outputs]
    # in one batch, penalized rows between free ones (the penalties are given to their rows alone)
    mixed = llm.generate([prompts[0], prompts[0], prompts[1], prompts[1]], [free, params, free, params],
                         use_tqdm=False)
    alone = [o.outputs[0].token_ids for pair in zip(plain, outputs, strict=True) for o in pair]
    assert [o.outputs[0].token_ids for o in mixed] == alone


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("kind", ["qwen2", "gemma3", "granite"])  # gemma3: soft-capped logits; granite: scaled
def test_logprobs_equal_log_softmax_of_hf_logits(tiny_checkpoint, temperature, kind):
    path = tiny_checkpoint(kind)
    prompt = random_prompts([12], seed=4)[0]
    llm = LLM(path, device="cpu")
    params = SamplingParams(temperature=temperature, max_tokens=6, ignore_eos=True, logprobs=3, seed=7)
    completion = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    hf = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + completion.token_ids])).logits[0].float()
    reference = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    assert len(completion.logprobs) == 6
    for step, (token_id, entry) in enumerate(zip(completion.token_ids, completion.logprobs, strict=True)):
        ref = reference[step]
        assert entry[token_id].logprob == pytest.approx(ref[token_id].item(), abs=1e-4)
        assert entry[token_id].rank == int((ref > ref[token_id]).sum()) + 1
        top_values, top_ids = ref.topk(3)
        for rank, (tid, value) in enumerate(zip(top_ids.tolist(), top_values.tolist(), strict=True), 1):
            assert entry[tid].logprob == pytest.approx(value, abs=1e-4) and entry[tid].rank == rank
        assert set(entry) <= set(top_ids.tolist()) | {token_id}
        assert all(lp.decoded_token == llm.get_tokenizer().decode([t]) for t, lp in entry.items())
    again = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]  # the tokens' texts, looked up this time
    assert again.logprobs == completion.logprobs
    expected_sum = sum(reference[i, t].item() for i, t in enumerate(completion.token_ids))
    assert completion.cumulative_logprob == pytest.approx(expected_sum, abs=1e-3)


def test_cumulative_logprob_comes_without_asking_for_logprobs(tiny_checkpoint):
    llm = LLM(tiny_checkpoint("qwen2"), device="cpu", dtype="float32")
    plain, scored = (llm.generate([[5, 6]], SamplingParams(max_tokens=4, temperature=0, logprobs=k),
                                  use_tqdm=False)[0].outputs[0] for k in (None, 0))
    assert plain.logprobs is None and plain.token_ids == scored.token_ids
    total = sum(entry[token].logprob for token, entry in zip(scored.token_ids, scored.logprobs, strict=True))
    assert plain.cumulative_logprob == pytest.approx(total, abs=1e-5) and total < 0


# 7 tokens a step: the prompt is scored over several chunks; 3 rows at once: each chunk in slices
@pytest.mark.parametrize("budget, rows_at_once", [(None, 1024), (7, 1024), (None, 3)])
def test_prompt_logprobs_equal_log_softmax_of_hf_logits(tiny_checkpoint, budget, rows_at_once, monkeypatch):
    from pagedllm.worker import sampling_inputs

    monkeypatch.setattr(sampling_inputs, "SCORED_ROWS_AT_ONCE", rows_at_once)
    path = tiny_checkpoint("qwen2")
    prompt = random_prompts([20], seed=6)[0]
    llm = LLM(path, device="cpu", max_num_batched_tokens=budget)
    llm.generate([prompt], SamplingParams(max_tokens=2), use_tqdm=False)  # the prompt is now in the prefix cache
    out = llm.generate([prompt], SamplingParams(max_tokens=2, prompt_logprobs=2), use_tqdm=False)[0]
    assert out.num_cached_tokens == 0  # scoring the prompt bypasses the cache
    hf = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        reference = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)
    assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
    for position in range(1, len(prompt)):
        entry, ref, token = out.prompt_logprobs[position], reference[position - 1], prompt[position]
        assert entry[token].logprob == pytest.approx(ref[token].item(), abs=1e-4)
        assert entry[token].rank == int((ref > ref[token]).sum()) + 1
        top_values, top_ids = ref.topk(2)
        assert all(entry[t].logprob == pytest.approx(v, abs=1e-4) for t, v in zip(top_ids.tolist(),
                                                                                    top_values.tolist(), strict=True))
        assert set(entry) <= set(top_ids.tolist()) | {token}


@pytest.mark.parametrize("max_logprobs", [20, -1])
def test_profile_sampler_samples_the_costliest_step(max_logprobs):
    """The profile run's sampling takes every path a step can (greedy, random with all filters,
    penalties, seeded rows, the most logprobs) without error, and leaves the logits untouched."""
    from pagedllm.layers.sampler import profile_sampler

    logits = torch.randn(9, 300)
    before = logits.clone()
    profile_sampler(logits, max_logprobs)
    assert torch.equal(logits, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton's compiled kernels need CUDA")
def test_profile_sampler_compiles_what_every_step_needs():
    """After the profile run's sampling, steps of any size, greedy or random, seeded, with logprobs,
    compile no sampling kernel mid-run (each compile costs a user ~0.2 s)."""
    from pagedllm.layers.sampler import profile_sampler
    from pagedllm_kernels import sampling_ops

    kernels = [sampling_ops._token_logprobs_kernel, sampling_ops._merge_logprob_splits_kernel,
               sampling_ops._seeded_exponential_kernel]

    def compiled() -> list[int]:
        return [sum(len(caches[0]) for caches in k.device_caches.values()) for k in kernels]

    for kernel in kernels:
        kernel.device_caches.clear()  # compiled again here (from triton's disk cache), as in a fresh process
    logits = torch.randn(256, 151_936, device="cuda", dtype=torch.bfloat16)  # Qwen3's: up to 38 splits a row
    profile_sampler(logits, 20)
    after_profile = compiled()
    assert all(after_profile)
    sampler = Sampler(torch.Generator(device="cuda"))
    for rows in (1, 2, 7, 17, 100, 255, 256):  # 17: 16 splits a row
        temperatures = torch.tensor([0.0, 0.7] * (rows // 2) + [0.7] * (rows % 2))
        seeded = torch.arange(rows)[temperatures > 0]
        for meta in (SamplingMetadata(torch.zeros(rows), None, None, all_greedy=True, max_num_logprobs=5),
                     SamplingMetadata(torch.zeros(rows), None, None, all_greedy=True),
                     SamplingMetadata(temperatures, None, torch.full((rows,), 0.9), all_greedy=False,
                                      seeded=SeededRows(seeded, seeded, seeded))):
            sampler(logits[:rows], meta)
    assert compiled() == after_profile


def test_a_requests_own_token_lists_become_tensors_once_and_stay_in_the_vocabulary():
    """allowed_token_ids and logit_bias are tensors made once when the request is added (a step
    over a 150,000-token logit_bias as Python lists took 181 ms of host time, for the whole batch);
    each step concatenates them, keeping ids within the vocabulary even past validation."""
    from pagedllm.engine.request import Request, SamplingTensors
    from pagedllm.worker.sampling_inputs import sampling_metadata

    def request(**fields):
        params = SamplingParams(**fields)
        return Request("r", [1], params, 8, frozenset(), tensors=SamplingTensors.of(params, [1]))

    rows = [request(), request(logit_bias={3: 1.5, 700: -2.0, 9: 100}), request(allowed_token_ids=[4, 600, 2]),
            request(logit_bias={5: -1.0})]
    meta = sampling_metadata(rows, [0] * 4, 512, pin=False)
    bias_rows, bias_ids, biases = meta.logit_bias
    assert bias_rows.tolist() == [1, 1, 3] and bias_ids.tolist() == [3, 9, 5]  # 700 is past the vocabulary
    assert biases.tolist() == [1.5, 100.0, -1.0] and biases.dtype == torch.float32
    assert [(row, ids.tolist()) for row, ids in meta.allowed_token_ids] == [(2, [4, 2])]


def test_a_steps_sampling_inputs_are_the_last_ones_only_for_the_same_rows_that_change_by_nothing():
    """A decode batch of the same requests in the same order reuses the last step's sampling inputs,
    unless a row's change by the step: a seed's position, bans before min_tokens, penalties."""
    from types import SimpleNamespace

    from pagedllm.engine.request import Request, SamplingTensors
    from pagedllm.worker.executor import Executor

    def request(**fields):
        params = SamplingParams(**fields)
        return Request("r", [1], params, 8, frozenset({2}), tensors=SamplingTensors.of(params, [1]))

    executor = SimpleNamespace(_last_sampling=None)

    def inputs(rows, positions):
        return Executor._sampling_metadata(executor, rows, positions, 512, False)

    plain = [request(temperature=0.5), request(temperature=0, top_k=3)]
    first = inputs(plain, [4, 9])
    assert inputs(list(plain), [5, 10]) is first  # (a new list of the same requests)
    swapped = inputs(plain[::-1], [10, 5])
    assert swapped is not first and swapped.temperatures.tolist() == [0.0, 0.5]
    other = inputs([plain[0], request(temperature=0.9)], [6, 3])
    assert other.temperatures.tolist() == [0.5, pytest.approx(0.9)]
    for changing in (request(temperature=0.7, seed=3), request(min_tokens=2), request(presence_penalty=0.5)):
        rows = [plain[0], changing]
        a, b = inputs(rows, [7, 1]), inputs(rows, [8, 2])
        assert a is not b
    seeded = [request(temperature=0.7, seed=3)]
    assert inputs(seeded, [1]).seeded.positions.tolist() == [1] and inputs(seeded, [2]).seeded.positions.tolist() == [2]
    greedy_seeded = [request(temperature=0, seed=3)]  # (greedy: its seed draws nothing)
    assert inputs(greedy_seeded, [1]) is inputs(greedy_seeded, [2])
