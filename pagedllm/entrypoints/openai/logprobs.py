"""Engine logprobs into the OpenAI API's shapes: the legacy completions' parallel lists, chat's
per-token objects, and vLLM's ``prompt_logprobs``."""

from pagedllm.entrypoints.openai.protocol import (
    ChatLogprobs,
    CompletionLogprobs,
    PromptLogprob,
    TokenLogprob,
    TopLogprob,
)
from pagedllm.outputs import Logprob, RequestOutput


def add_completion_logprobs(out: CompletionLogprobs, token_ids: list[int],
                             entries: list[dict[int, Logprob] | None] | None, first_text: str | None,
                             offset: int) -> None:
    """Append the legacy completions logprobs of ``token_ids``; an entry of None (the prompt's
    first token) has no logprob, and its text is ``first_text``."""
    for token_id, entry in zip(token_ids, entries or [None] * len(token_ids), strict=True):
        if entry is None:
            token, logprob, top = first_text or "", None, None
        else:
            token = entry[token_id].decoded_token or ""
            logprob = entry[token_id].logprob
            top = {lp.decoded_token or "": lp.logprob for lp in entry.values()}
        out.tokens.append(token)
        out.token_logprobs.append(logprob)
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(token)


def vllm_prompt_logprobs(final: RequestOutput) -> list[dict[str, PromptLogprob] | None] | None:
    if final.prompt_logprobs is None:
        return None
    return [None if entry is None else
            {str(t): PromptLogprob(logprob=lp.logprob, rank=lp.rank, decoded_token=lp.decoded_token)
             for t, lp in entry.items()} for entry in final.prompt_logprobs]


def chat_logprobs(entries: list[dict[int, Logprob]] | None, token_ids: list[int], k: int) -> ChatLogprobs | None:
    """OpenAI's chat logprobs: each token's own, and the ``k`` most likely tokens in its place."""
    if entries is None:
        return None

    def fields(lp: Logprob) -> dict:
        text = lp.decoded_token or ""
        return {"token": text, "logprob": lp.logprob, "bytes": list(text.encode("utf-8", "replace"))}

    content = []
    for token_id, entry in zip(token_ids, entries, strict=True):
        ranked = sorted(entry.values(), key=lambda lp: lp.rank)[:k]  # the sampled token may rank below k
        top = [TopLogprob(**fields(lp)) for lp in ranked]
        content.append(TokenLogprob(**fields(entry[token_id]), top_logprobs=top))
    return ChatLogprobs(content=content)


