"""Tool calls (OpenAI's ``tools`` and ``tool_choice``): a chat answer's calls read out of its text
with vLLM's ``--enable-auto-tool-choice --tool-call-parser`` (``tool_choice`` "auto"), whole or as
it streams; and, for ``tool_choice`` "required" or a named function, a structured output that
forces the calls, which needs no parser (as in vLLM). A named function's answer is its arguments,
so they stream as the model writes them, as vLLM streams them.

The parsers, by the format a model writes its calls in:

- ``hermes`` (Hermes 2 Pro and later, Qwen2.5, Qwen3, QwQ): ``<tool_call>{"name": ..., "arguments":
  {...}}</tool_call>``, any number of them, with text around them;
- ``llama3_json`` (Llama 3.1-3.3): an answer that is its calls, ``{"name": ..., "parameters": {...}}``,
  after ``<|python_tag|>`` or not, several separated by ``;``;
- ``mistral``: ``[TOOL_CALLS]`` and a JSON list of ``{"name": ..., "arguments": {...}}``;
- ``openai`` (gpt-oss): harmony messages to ``functions.NAME`` (``<|channel|>commentary
  to=functions.NAME<|message|>{...}<|call|>``), which ``reasoning.HarmonySplitter`` reads from the
  tokens and hands over.

A call that is not valid JSON stays in the answer's text, as the model wrote it. The same splitter
serves a stream and a whole answer (fed at once), so both split alike; a tag cut between two chunks
is held back until it is whole, and a call is sent once it is complete (a named function's call in
pieces, as it comes)."""

import json
from dataclasses import dataclass, field

TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral", "openai")
_TAGS = {"hermes": ("<tool_call>", "</tool_call>"), "mistral": ("[TOOL_CALLS]", None),
         "llama3_json": ("<|python_tag|>", None)}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object's text (a named call's piece: the next part of it)


@dataclass(frozen=True)
class ToolUse:
    """What a chat request asks of tools: ``choice`` "auto" (the model's own calls, read by
    ``parser``), "required" (one or more, forced) or "named" (a call of ``name``, forced)."""

    choice: str
    parser: str | None = None
    name: str | None = None
    schema: dict | None = None  # the forced calls' JSON schema
    parallel: bool = True  # more than one call allowed (OpenAI's parallel_tool_calls)

    def splitter(self) -> "ToolCallSplitter":
        return ToolCallSplitter(self.parser if self.choice == "auto" else self.choice, self.name,
                                None if self.parallel else 1)

    def finish_reason(self, called: bool, finish_reason: str | None) -> str | None:
        """OpenAI's: "tool_calls" where the model chose to call (not where a named call was forced)."""
        return "tool_calls" if called and finish_reason == "stop" and self.choice != "named" else finish_reason


def tool_use(tools: list | None, tool_choice: object, parser: str | None, parallel: bool = True) -> ToolUse | None:
    """The request's tool use; None where its text is its answer (no tools, or tool_choice "none").
    ``parallel=False`` (OpenAI's ``parallel_tool_calls``) allows one call at most. A ValueError
    names what is wrong and, as its second argument, the field."""
    if not tools and tool_choice not in (None, "none", "auto"):
        raise ValueError(f"tool_choice {tool_choice!r:.100} needs tools: give the functions in tools", "tool_choice")
    if not tools or tool_choice == "none":
        return None
    functions = _functions(tools)
    if tool_choice is None or tool_choice == "auto":  # with tools, "auto" is the default (OpenAI's)
        if parser is None:
            raise ValueError('tool_choice "auto" (the default where tools are given) needs the server started with '
                             "--enable-auto-tool-choice and --tool-call-parser, to read the model's calls; give "
                             'tool_choice "none", "required" or a function', "tool_choice")
        return ToolUse("auto", parser, parallel=parallel)
    if tool_choice == "required":
        calls = [{"type": "object", "properties": {"name": {"const": name}, "parameters": parameters},
                  "required": ["name", "parameters"]} for name, parameters in functions.items()]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}} | ({} if parallel else {"maxItems": 1})
        return ToolUse("required", schema=schema, parallel=parallel)
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" or not isinstance(name, str):
        raise ValueError('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                         f'{{"name": NAME}}}}, not {tool_choice!r:.100}', "tool_choice")
    if name not in functions:
        raise ValueError(f"tool_choice names the function {name!r:.100}, which tools do not give (they give "
                         f"{', '.join(functions)})"[:400], "tool_choice")
    return ToolUse("named", name=name, schema=functions[name])


def _functions(tools: list) -> dict[str, dict]:
    """Each function's parameters' JSON schema, by its name."""
    functions = {}
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise ValueError(f'tools[{i}] must be {{"type": "function", "function": {{"name", "parameters"}}}}, '
                             f"not {tool!r:.100}", "tools")
        name, parameters = function.get("name"), function.get("parameters", {"type": "object"})
        if not isinstance(name, str) or not name:
            raise ValueError(f"tools[{i}].function.name must be a non-empty string, not {name!r:.100}", "tools")
        if not isinstance(parameters, dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema (an object), not "
                             f"{parameters!r:.100}", "tools")
        functions[name] = parameters
    return functions


@dataclass
class ToolCallSplitter:
    """One choice's answer text, fed as it comes: ``feed`` returns its new plain text and the calls
    completed in it. ``mode`` is a parser's name (``openai``'s calls come read already, as
    ``found``), "required" for a forced list of calls (read at its end), or "named": the answer
    is the named function's arguments, and each piece of it comes back as it is fed, a
    ``ToolCall`` whose ``arguments`` continue the ones before (a named call is made whatever its
    answer, cut short or not, as vLLM makes it)."""

    mode: str
    name: str | None = None  # the named function
    most: int | None = None  # calls kept at most (later ones are dropped, as vLLM drops them)
    held: str = ""  # text that may begin a tag, waiting for the next chunk
    call: str | None = None  # the text of a call begun, not yet complete
    opened: str = ""  # the tag that began it
    begun: bool = False  # llama3_json: whether the answer's first character has come
    calls: list[ToolCall] = field(default_factory=list)  # every call so far (a named call's pieces)

    def feed(self, text: str, last: bool = False, found: list[ToolCall] = ()) -> tuple[str | None, list[ToolCall]]:
        """``found``: the calls harmony's splitter read from the tokens (the ``openai`` parser's)."""
        text, self.held = self.held + text, ""
        if self.mode == "named":
            pieces = [ToolCall(self.name, text)] if text else []
            self.calls += pieces
            return None, pieces
        plain, calls = [], list(found)
        if self.mode == "openai":
            plain.append(text)
        elif self.mode == "required":
            self.call = (self.call or "") + text
            if last:
                forced = _forced_calls(self.call)
                plain.append(self.call if forced is None else "")
                calls += forced or []
                self.call = None
        else:
            self._feed_parsed(text, last, plain, calls)
        if self.most is not None:
            calls = calls[:max(0, self.most - len(self.calls))]
        self.calls += calls
        return "".join(plain) or None, calls

    def _feed_parsed(self, text: str, last: bool, plain: list[str], calls: list[ToolCall]) -> None:
        start, end = _TAGS[self.mode]
        while True:
            if self.call is not None:
                self.call += text
                close = self.call.find(end) if end else -1
                if close < 0 and not last:
                    return
                body, text = (self.call[:close], self.call[close + len(end):]) if close >= 0 else (self.call, "")
                self.call = None
                parsed = _parsed_calls(body)
                calls += parsed or []
                if parsed is None:  # not a call after all: the text as written
                    plain.append(self.opened + body + (end if close >= 0 else ""))
                continue
            if self.mode == "llama3_json" and not self.begun:  # calls only where the answer begins with one
                stripped = text.lstrip()
                if not stripped or (start.startswith(stripped) and not last):
                    if last:
                        plain.append(text)
                    else:
                        self.held = text
                    return
                self.begun = True
                if stripped.startswith(start) or stripped.startswith("{"):
                    self.opened = start if stripped.startswith(start) else ""
                    self.call, text = "", stripped[len(self.opened):]
                    continue
                plain.append(text)
                return
            if self.mode == "llama3_json":
                plain.append(text)
                return
            at = text.find(start)
            if at >= 0:
                plain.append(text[:at])
                self.call, self.opened, text = "", start, text[at + len(start):]
                continue
            keep = 0 if last else held_back(text, start)
            plain.append(text[:len(text) - keep])
            self.held = text[len(text) - keep:]
            return


def held_back(text: str, tag: str) -> int:
    """How many of text's last characters may begin ``tag`` (a streamed text's, to wait for the next chunk)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def _json_values(text: str) -> list:
    """The JSON values in ``text``, one after another (separated by whitespace or ``;``)."""
    decoder, values, at = json.JSONDecoder(), [], 0
    while True:
        while at < len(text) and (text[at].isspace() or text[at] == ";"):
            at += 1
        if at == len(text):
            return values
        value, at = decoder.raw_decode(text, at)
        values.append(value)


def _parsed_calls(text: str) -> list[ToolCall] | None:
    """The calls written in ``text`` (objects with a name and arguments or parameters, or lists of
    them); None unless all of it is."""
    try:
        values = _json_values(text)
    except ValueError:
        return None
    objects = [v for value in values for v in (value if isinstance(value, list) else [value])]
    calls = [tool_call(o.get("name"), o.get("arguments", o.get("parameters", {}))) if isinstance(o, dict) else None
             for o in objects]
    return calls if calls and None not in calls else None


def tool_call(name: object, arguments: object) -> ToolCall | None:
    """A call of ``name`` with ``arguments`` (an object, or its JSON text); None unless both are so."""
    if not isinstance(name, str) or not name:
        return None
    if isinstance(arguments, str):  # arguments written as a JSON string: kept if they are a JSON object
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


def _forced_calls(text: str) -> list[ToolCall] | None:
    """"required"'s calls, a list of ``{"name", "parameters"}``; None where the answer is not that
    (cut short by max_tokens)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    calls = [tool_call(o.get("name"), o.get("parameters")) if isinstance(o, dict) else None
             for o in (value if isinstance(value, list) else [])]
    return calls if calls and None not in calls else None


def needs_special_tokens(tokenizer, parser: str) -> bool:
    """Whether the parser's tag is a special token of this tokenizer, which the text leaves out
    unless asked (vLLM's parsers ask: ``skip_special_tokens=False``)."""
    special = getattr(tokenizer, "all_special_tokens", ()) if tokenizer is not None else ()
    return parser in _TAGS and _TAGS[parser][0] in special
