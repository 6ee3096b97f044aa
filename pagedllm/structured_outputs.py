"""What a request's output must match, as vLLM names it: a JSON schema, any JSON object, a regular
expression, one of some strings, or an EBNF grammar (``SamplingParams(structured_outputs=...)``)."""

import json
from dataclasses import dataclass, fields

KINDS = ("json", "json_object", "regex", "choice", "grammar")
# xgrammar's compile time grows steeply with a schema's nesting (100 levels 0.01 s, 250 over 4 s,
# 400 levels 17 s on this project's CPU machine): deeper schemas are refused, not compiled.
MAX_SCHEMA_DEPTH = 100
BACKENDS = (None, "auto", "xgrammar")


@dataclass
class StructuredOutputsParams:
    """Exactly one of ``json`` (a JSON schema, as a dict or a string), ``json_object=True`` (any
    JSON object), ``regex``, ``choice`` (a list of strings) or ``grammar`` (EBNF in xgrammar's
    dialect, GBNF-like: ``root ::= ...``). ``disable_any_whitespace`` makes JSON compact."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    backend: str | None = None  # xgrammar is the one backend here ("auto" means it too)
    whitespace_pattern: str | None = None  # older vLLM's; accepted, xgrammar ignores it

    def __post_init__(self) -> None:
        given = [kind for kind in KINDS if getattr(self, kind) not in (None, False)]
        if len(given) != 1:
            raise ValueError("SamplingParams.structured_outputs is invalid: give exactly one of json, json_object, "
                             f"regex, choice, grammar (got {given or 'none'})")
        checks = {
            "json": self.json is None or isinstance(self.json, (str, dict)),
            "json_object": self.json_object in (None, True, False),
            "regex": self.regex is None or isinstance(self.regex, str),
            "choice": self.choice is None or (isinstance(self.choice, (list, tuple)) and len(self.choice) > 0
                                              and all(isinstance(c, str) for c in self.choice)),
            "grammar": self.grammar is None or isinstance(self.grammar, str),
            "disable_any_whitespace": isinstance(self.disable_any_whitespace, bool),
            "backend": self.backend in BACKENDS,
        }
        rules = {"json": "must be a JSON schema (a dict or a string)", "json_object": "must be True",
                 "regex": "must be a string", "choice": "must be a non-empty list of strings",
                 "grammar": "must be a string (EBNF)", "disable_any_whitespace": "must be True or False",
                 "backend": "must be 'xgrammar', 'auto' or None (xgrammar is the one backend here)"}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"SamplingParams.structured_outputs.{name}={getattr(self, name)!r} is invalid: "
                                 f"it {rules[name]}")
        if self.choice is not None:
            self.choice = list(self.choice)
        if self.json is not None:
            _check_schema(self.json)

    @property
    def kind(self) -> str:
        return next(kind for kind in KINDS if getattr(self, kind) not in (None, False))

    @property
    def schema(self) -> str | None:
        """The JSON schema as a string (None unless ``json`` is given)."""
        return self.json if isinstance(self.json, str) or self.json is None else json.dumps(self.json)

    @classmethod
    def from_response_format(cls, fmt: object) -> "StructuredOutputsParams | None":
        """OpenAI's ``response_format``: ``{"type": "text"}`` (None), ``{"type": "json_object"}``, or
        ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}``."""
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind not in ("text", "json_object", "json_schema"):
            raise ValueError(f"response_format={fmt!r} is invalid: its type must be text, json_object or json_schema")
        if kind == "text":
            return None
        if kind == "json_object":
            return cls(json_object=True)
        schema = fmt.get("json_schema")
        if not isinstance(schema, dict) or schema.get("schema") is None:
            raise ValueError("response_format of type json_schema is invalid: it needs json_schema.schema")
        return cls(json=schema["schema"])

    @classmethod
    def coerce(cls, value: object, name: str) -> "StructuredOutputsParams | None":
        """Take a StructuredOutputsParams, a dict of its fields, or None."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - {f.name for f in fields(cls)})
            if unknown:
                raise ValueError(f"SamplingParams.{name} is invalid: StructuredOutputsParams has no field "
                                 f"{unknown[0]!r}")
            return cls(**value)
        raise ValueError(f"SamplingParams.{name}={value!r} is invalid: it must be a StructuredOutputsParams "
                         "(or a dict of its fields)")


def _check_schema(schema: str | dict) -> None:
    """A JSON schema given as a string must be JSON; either way it may nest at most MAX_SCHEMA_DEPTH deep."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except (ValueError, RecursionError) as err:
            raise ValueError(f"SamplingParams.structured_outputs.json is invalid: it is not JSON ({err})") from None
    level, depth = [schema], 0
    while level:  # breadth first, so that no nesting can exhaust Python's stack
        depth += 1
        if depth > MAX_SCHEMA_DEPTH:
            raise ValueError(f"SamplingParams.structured_outputs.json is invalid: it nests deeper than "
                             f"{MAX_SCHEMA_DEPTH} levels")
        level = [child for node in level if isinstance(node, (dict, list))
                 for child in (node.values() if isinstance(node, dict) else node) if isinstance(child, (dict, list))]


GuidedDecodingParams = StructuredOutputsParams  # the name vLLM used before 0.11
