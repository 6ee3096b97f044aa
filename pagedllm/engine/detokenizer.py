"""Incremental detokenization: a request's text grows with each token, correct for multi-byte
characters split across tokens and for tokens whose text depends on their neighbours."""

from functools import partial

import tokenizers
from transformers import PreTrainedTokenizerBase

from pagedllm.sampling_params import SamplingParams

# Tokens of context re-decoded before the unread ones, so that merges across steps come out right.
_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool,
                 spaces_between_special_tokens: bool = True):
        backend = getattr(tokenizer, "_tokenizer", None)
        if isinstance(backend, tokenizers.Tokenizer) and not tokenizer.clean_up_tokenization_spaces:
            # what the fast tokenizer's decode comes to, without its argument handling (4x the time;
            # a streamed request decodes twice a token)
            self.decode = partial(backend.decode, skip_special_tokens=skip_special_tokens)
        else:
            self.decode = partial(tokenizer.decode, skip_special_tokens=skip_special_tokens,
                                  spaces_between_special_tokens=spaces_between_special_tokens)
        self.text = ""
        self._prefix_offset = 0  # tokens before this are in self.text for good
        self._read_offset = 0  # tokens before this have been turned into text

    def update(self, token_ids: list[int], start: int = 0) -> str:
        """Take the tokens so far (the output's, from ``start``: a request passes all its tokens
        rather than copy its output's at every token); return the text they add (empty while a
        character is still incomplete)."""
        prefix, read = start + self._prefix_offset, start + self._read_offset
        prefix_text = self.decode(token_ids[prefix:read])
        new_text = self.decode(token_ids[prefix:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""  # nothing new yet, or a multi-byte character is not complete
        delta = new_text[len(prefix_text) :]
        self.text += delta
        self._read_offset = len(token_ids) - start
        self._prefix_offset = max(self._read_offset - _CONTEXT_TOKENS, 0)
        return delta


def incremental_detokenizer(tokenizer: PreTrainedTokenizerBase | None,
                            params: SamplingParams) -> IncrementalDetokenizer | None:
    """A request's text as it goes, where it has text (a tokenizer, and ``detokenize``)."""
    if tokenizer is None or not params.detokenize:
        return None
    return IncrementalDetokenizer(tokenizer, params.skip_special_tokens, params.spaces_between_special_tokens)


def find_stop_string(text: str, num_new_chars: int, stop: list[str]) -> tuple[str, int] | None:
    """The first stop string that ends in the last ``num_new_chars`` characters of ``text``, and
    where it starts."""
    best = None
    for s in stop:
        start = text.find(s, max(len(text) - num_new_chars - len(s) + 1, 0))
        if start != -1 and (best is None or start < best[1]):
            best = (s, start)
    return best


def stop_string_hit(request) -> str | None:
    """Decode the request's newest token into its text; if a stop string now ends there (and
    ``min_tokens`` are out), cut the text at it (keeping it with ``include_stop_str_in_output``)
    and return it. The engine then ends the request; a driver's copy of it (``progress``), fed the
    same tokens one by one, cuts its text the same way."""
    detokenizer = request.detokenizer
    num_new_chars = len(detokenizer.update(request.token_ids, request.num_prompt_tokens))
    params = request.sampling_params
    if not params.stop or not num_new_chars or request.num_output_tokens < params.min_tokens:
        return None
    hit = find_stop_string(detokenizer.text, num_new_chars, params.stop)
    if hit is None:
        return None
    stop, start = hit
    detokenizer.text = detokenizer.text[: start + (len(stop) if params.include_stop_str_in_output else 0)]
    return stop
