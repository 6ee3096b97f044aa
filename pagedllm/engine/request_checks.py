"""What a request must be to run, checked against the model before it is queued: together with
SamplingParams' own checks, a request that passes cannot fail in the engine."""

from typing import Any

from transformers import PreTrainedTokenizerBase

from pagedllm.config import EngineConfig
from pagedllm.engine.block_manager import CacheCapacity
from pagedllm.engine.structured_output import GrammarCompiler
from pagedllm.sampling_params import SamplingParams


def truncated_prompt(prompt_token_ids: list[int], params: SamplingParams, max_model_len: int) -> list[int]:
    """The prompt with ``truncate_prompt_tokens`` applied: its last k tokens (-1: max_model_len)."""
    keep = params.truncate_prompt_tokens
    if keep is None:
        return prompt_token_ids
    return prompt_token_ids[-(max_model_len if keep == -1 else keep):]


def validate_request(config: EngineConfig, tokenizer: PreTrainedTokenizerBase | None, cache: CacheCapacity,
                     grammars: GrammarCompiler, eos_token_ids: set[int], prompt_token_ids: list[int],
                     params: SamplingParams, compile_grammar: bool = True) -> None:
    """Raise ValueError if the request could never run, naming the field; nothing is changed.
    ``compile_grammar=False`` leaves the structured output's compile to its caller."""
    ids = truncated_prompt(prompt_token_ids, params, config.max_model_len)
    check_request(config, tokenizer, cache, ids, params)
    bad_words = bad_word_token_ids(tokenizer, params.bad_words) if params.bad_words else []
    if params.allowed_token_ids:
        check_a_token_is_left(params, eos_token_ids, bad_words)
    if params.structured_outputs is not None and compile_grammar:
        grammars.compile(params.structured_outputs)  # a schema, regex or grammar that does not compile


def check_request(config: EngineConfig, tokenizer: PreTrainedTokenizerBase | None, cache: CacheCapacity,
                  prompt_token_ids: list[int], params: SamplingParams) -> None:
    """Raise ValueError naming the prompt or the field if the request could never run."""
    ids = prompt_token_ids
    if not ids:
        raise ValueError("the prompt is empty: give at least one token")
    if (params.stop or params.bad_words) and tokenizer is None:
        raise ValueError("stop strings and bad words need a tokenizer, and this model has none: use stop_token_ids")
    vocab_size = config.hf_config.vocab_size
    if not (set(map(type, ids)) <= {int} and min(ids) >= 0 and max(ids) < vocab_size):  # fast when fine
        bad = [t for t in ids if type(t) is not int or not 0 <= t < vocab_size]
        raise ValueError(f"the prompt has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    for name, token_ids in (("stop_token_ids", params.stop_token_ids), ("allowed_token_ids", params.allowed_token_ids),
                            ("logit_bias", list(params.logit_bias or ()))):
        bad = [t for t in token_ids or () if t >= vocab_size]
        if bad:
            raise ValueError(f"SamplingParams.{name}={bad[:5]} is invalid: it must hold token ids of the "
                             f"vocabulary [0, {vocab_size})")
    if params.samples > config.max_num_samples:  # each sample is a sequence of its own, made when the request is added
        name = "best_of" if params.best_of else "n"
        raise ValueError(f"SamplingParams.{name}={params.samples} is invalid: a request may draw at most "
                         f"max_num_samples={config.max_num_samples} sequences")
    limit = vocab_size if config.max_logprobs == -1 else min(config.max_logprobs, vocab_size)
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(params, name)
        if value is not None and (vocab_size if value == -1 else value) > limit:
            raise ValueError(f"SamplingParams.{name}={value} is invalid: it must be at most {limit} "
                             f"(max_logprobs={config.max_logprobs}, vocabulary {vocab_size}; -1 is the whole "
                             "vocabulary)")
    max_len = config.max_model_len
    wanted = params.max_tokens or 1  # max_tokens=None needs room for one token at least
    if len(ids) + wanted > max_len:
        raise ValueError(f"the prompt has {len(ids)} tokens and asks for up to {wanted} more, {len(ids) + wanted} "
                         f"in all, but max_model_len is {max_len}: shorten the prompt or lower max_tokens")
    short = cache.shortfall(len(ids) + max_output_tokens(ids, params, max_len))
    if short:
        raise ValueError(f"the request needs {short[0]} KV cache blocks of {config.block_size} tokens, but the cache "
                         f"has only {short[1]}: shorten it or give the cache more blocks")


def check_a_token_is_left(params: SamplingParams, eos_token_ids: set[int], bad_words: list[list[int]]) -> None:
    """allowed_token_ids that the request's other values ban from its first output token on (stop
    tokens before min_tokens, one-token bad words) would leave the sampler nothing: it took token
    0 (a padding id) each step, silently."""
    allowed = set(params.allowed_token_ids)
    by_bad_words = allowed & {word[0] for word in bad_words if len(word) == 1}
    by_min_tokens = allowed & stop_token_ids(params, eos_token_ids) if params.min_tokens > 0 else set()
    if by_bad_words | by_min_tokens == allowed:
        why = [name for name, used in (("min_tokens", by_min_tokens), ("bad_words", by_bad_words)) if used]
        verb = "ban" if len(why) > 1 else "bans"
        raise ValueError(f"SamplingParams.allowed_token_ids={params.allowed_token_ids[:5]} is invalid: "
                         f"{' and '.join(why)} {verb} every one of them, leaving no token to sample")


def stop_token_ids(params: SamplingParams, eos_token_ids: set[int]) -> frozenset[int]:
    """The tokens that end the request: its own stop_token_ids and, unless ignore_eos, the model's EOS."""
    return frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(eos_token_ids))


def max_output_tokens(prompt_token_ids: list[int], params: SamplingParams, max_model_len: int) -> int:
    return params.max_tokens or max_model_len - len(prompt_token_ids)


def bad_word_token_ids(tokenizer: PreTrainedTokenizerBase, words: list[str]) -> list[list[int]]:
    """Each bad word's tokens, as it starts the text and after a space (as vLLM bans them)."""
    sequences = []
    for word in words:
        for text in (word.lstrip(), " " + word.lstrip()):
            token_ids = tokenizer.encode(text, add_special_tokens=False)
            if token_ids and token_ids not in sequences:
                sequences.append(token_ids)
    if not sequences:
        raise ValueError(f"SamplingParams.bad_words={words!r} is invalid: no word comes out as a token")
    return sequences


def refuse_lora(lora_request: Any) -> None:
    """vLLM's ``lora_request`` of a call: taken as None only."""
    if lora_request is not None:
        raise ValueError(f"lora_request={lora_request!r:.100} is invalid: it must be None: LoRA adapters are not "
                         "supported (merge the adapter into the weights, as peft's merge_and_unload does, and load "
                         "that)")


def first_come_first_served(priority: Any, num_prompts: int | None = None) -> None:
    """vLLM's ``priority``: one int (a request's), or a list of one per prompt (``num_prompts``).
    It means something only under vLLM's priority scheduling, which this engine does not have:
    as vLLM without it, any but 0 is refused."""
    if priority is None:
        return
    if num_prompts is not None and (not isinstance(priority, (list, tuple)) or len(priority) != num_prompts):
        raise ValueError(f"priority={priority!r:.100} is invalid: it must be a list of one int per prompt "
                         f"({num_prompts}), or None")
    if any(type(p) is not int or p != 0 for p in (priority if num_prompts is not None else [priority])):
        raise ValueError(f"priority={priority!r:.100} is invalid: requests are served first come, first served "
                         "here (priority scheduling is not supported): give 0s or None")


def one_completion(params: SamplingParams) -> None:
    """Jobs that write one completion a row (``pagedllm generate``, ``pagedllm.ray``) refuse n > 1,
    whose samples past the first they would drop without a word."""
    if params.n > 1:
        raise ValueError(f"SamplingParams.n={params.n} is invalid here: a row gets one completion: give each "
                         "sample a row of its own (with its own id and seed; rows of one prompt share its cache)")
