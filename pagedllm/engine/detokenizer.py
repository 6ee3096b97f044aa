"""Incremental detokenization: a request's text grows with each token, correct for multi-byte
characters split across tokens and for tokens whose text depends on their neighbours.

An output's text continues its prompt's: the prompt's last tokens are decoded before the output's
and their text taken off. A SentencePiece tokenizer (Llama 2, Mistral, Gemma, Phi-3) drops the
space of the first token it decodes ("▁Paris" alone is "Paris", after "▁in" it is " Paris"), so
``prompt + text`` would otherwise lose it; vLLM and HF's text-generation pipeline keep it too."""

from collections.abc import Callable
from functools import partial

import tokenizers
from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase

from pagedllm.sampling_params import SamplingParams

# Tokens of context re-decoded before the unread ones, so that merges across steps come out right;
# as many of the prompt's before the output's first.
_CONTEXT_TOKENS = 6


def _fast_backend(tokenizer: PreTrainedTokenizerBase) -> tokenizers.Tokenizer | None:
    """The Rust tokenizer whose plain decode is what ``tokenizer.decode`` gives (None: a slow tokenizer,
    or one that cleans up spaces after decoding)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    return backend if isinstance(backend, tokenizers.Tokenizer) and not tokenizer.clean_up_tokenization_spaces else None


def _decoder(tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool,
             spaces_between_special_tokens: bool) -> Callable[[list[int]], str]:
    backend = _fast_backend(tokenizer)
    if backend is not None:
        # what the fast tokenizer's decode comes to, without its argument handling (4x the time)
        return partial(backend.decode, skip_special_tokens=skip_special_tokens)
    return partial(tokenizer.decode, skip_special_tokens=skip_special_tokens,
                   spaces_between_special_tokens=spaces_between_special_tokens)


def _prompt_context(decode: Callable[[list[int]], str], token_ids: list[int], start: int) -> tuple[int, str]:
    """How many of the prompt's last tokens go before the output's, and their text: none where they
    end in half a character (their text would change under the output's first token)."""
    context = min(start, _CONTEXT_TOKENS)
    text = decode(token_ids[start - context:start]) if context else ""
    return (0, "") if text.endswith("\ufffd") else (context, text)


class IncrementalDetokenizer:
    """A fast tokenizer's text grows through its ``DecodeStream`` (the same re-decoding of a few
    tokens of context, in Rust: 1.2 us a token against 6.6 here, demo tokenizer, 2-core x86), which
    a streamed request's driver pays at every token; elsewhere, or should the stream fail (its text
    before the new tokens changed), by re-decoding here."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool,
                 spaces_between_special_tokens: bool = True):
        self.decode = _decoder(tokenizer, skip_special_tokens, spaces_between_special_tokens)
        self.skip_special_tokens = skip_special_tokens
        self.text = ""
        self._backend = _fast_backend(tokenizer)
        self._stream: DecodeStream | None = None
        self._fed = 0  # output tokens given to the stream
        self._context: int | None = None  # the prompt's tokens before the output's, set at the first update
        self._prefix_offset = 0  # tokens before this are in self.text for good (or are the prompt's)
        self._read_offset = 0  # tokens before this have been turned into text

    def update(self, token_ids: list[int], start: int = 0) -> str:
        """Take the tokens so far (the prompt's, then from ``start`` the output's: a request passes
        all its tokens rather than copy its output's at every token); return the text they add
        (empty while a character is still incomplete)."""
        if self._context is None:  # the first: what is read so far is the prompt's context
            self._context = _prompt_context(self.decode, token_ids, start)[0]
            self._prefix_offset = -self._context
            if self._backend is not None:
                self._stream = DecodeStream(ids=token_ids[start - self._context:start],
                                            skip_special_tokens=self.skip_special_tokens)
        delta = ""
        if self._stream is not None:
            try:
                for token in token_ids[start + self._fed:]:
                    self._fed += 1
                    piece = self._stream.step(self._backend, token)
                    if piece is not None:
                        delta += piece
                        self._read_offset = self._fed
                self.text += delta
                return delta
            except Exception:  # tokenizers' DecodeStreamError: re-decode here from what is read
                self.text += delta
                self._stream = None
                self._prefix_offset = max(self._read_offset - _CONTEXT_TOKENS, -self._context)
        return delta + self._redecode(token_ids, start)

    def _redecode(self, token_ids: list[int], start: int) -> str:
        prefix_text = self.decode(token_ids[start + self._prefix_offset:start + self._read_offset])
        new_text = self.decode(token_ids[start + self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""  # nothing new yet, or a multi-byte character is not complete
        delta = new_text[len(prefix_text) :]
        self.text += delta
        self._read_offset = len(token_ids) - start
        self._prefix_offset = max(self._read_offset - _CONTEXT_TOKENS, -self._context)
        return delta


def output_text(tokenizer: PreTrainedTokenizerBase, params: SamplingParams, token_ids: list[int], start: int) -> str:
    """The text of the output tokens from ``start`` (after the prompt's), all at once: what an
    incremental detokenizer fed them would hold, a last half character included."""
    decode = _decoder(tokenizer, params.skip_special_tokens, params.spaces_between_special_tokens)
    context, prompt_text = _prompt_context(decode, token_ids, start)
    return decode(token_ids[start - context:])[len(prompt_text):]


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
