"""A request's output format as a llama.cpp grammar (docs/protocols.md#output-formats).

A :class:`~p2pnode.inference.engine.Format` travels in the infer request as
data (a kind, a JSON schema, tool names and their argument schemas), never
as grammar text: the provider that generates and the auditor that checks
both build the grammar from it here, with llama-cpp-python's JSON-schema
converter, so neither runs a stranger's grammar. A stranger's schema is
bounded first (:func:`check`): its size, its nesting, every repetition count
(the converter writes ``maxItems: 10**9`` out as a billion rules) and its
references (local only).

Tool calls read as in the Hermes/Qwen convention that many chat templates
already use (``inference/tools.py`` writes and parses them)::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

from p2pnode.errors import BadRequestError
from p2pnode.inference import native
from p2pnode.inference.engine import JSON_OBJECT, JSON_SCHEMA, TOOLS, Format
from p2pnode.inference.tools import CALL_CLOSE, CALL_GAP, CALL_OPEN, TOOL_NAME

MAX_FORMAT_CHARS: Final = 32 * 1024
"""A format's schema and tool schemas together, as JSON text."""
MAX_TOOLS: Final = 64
MAX_DEPTH: Final = 16
"""Nesting of objects and arrays within one schema."""
MAX_COUNT: Final = 128
"""The largest repetition count a schema may ask for (``maxItems``, ``minLength``,
a pattern's ``{n,m}``...)."""
MAX_GRAMMAR_CHARS: Final = 128 * 1024
MAX_NODES: Final = 1000
"""Subschemas in all of a format's schemas together."""
MAX_ALTERNATIVES: Final = 256
"""enum values, anyOf/oneOf/allOf branches and prefixItems in all, tools included."""
MAX_PROPERTIES: Final = 128
"""Properties (or definitions) of one object."""
MAX_NAME: Final = 128
MAX_PATTERN: Final = 512
CHOICES: Final = ("auto", "required")

_COUNTS: Final = frozenset(
    {
        "minItems",
        "maxItems",
        "minLength",
        "maxLength",
        "minProperties",
        "maxProperties",
    }
)
# Keywords the converter would leave unenforced: a schema using one is
# refused, never answered with JSON that may break it.
_UNENFORCED: Final = frozenset(
    {
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "uniqueItems",
        "contains",
        "minContains",
        "maxContains",
        "not",
        "if",
        "then",
        "else",
        "dependentRequired",
        "dependentSchemas",
        "patternProperties",
        "propertyNames",
        "unevaluatedProperties",
        "unevaluatedItems",
    }
)
# Keywords whose value maps names (not keywords) to schemas.
_SCHEMA_MAPS: Final = frozenset({"properties", "$defs", "definitions"})
_REPEAT: Final = re.compile(r"(\d{1,4})(?:,(\d{0,4}))?")
_LOCAL_REF: Final = re.compile(r"#/(?:\$defs|definitions)/[^/]+")
_ALTERNATIVES: Final = frozenset({"enum", "anyOf", "oneOf", "allOf", "prefixItems"})


def check(fmt: Format) -> None:
    """Raise :class:`BadRequestError` unless ``fmt`` is within this protocol's bounds."""
    size = len(fmt.schema) + sum(len(t.name) + len(t.parameters) for t in fmt.tools)
    if size > MAX_FORMAT_CHARS:
        raise BadRequestError(f"the output format's schemas exceed {MAX_FORMAT_CHARS} characters")
    if fmt.kind == JSON_OBJECT:
        if fmt.schema or fmt.tools:
            raise BadRequestError("a json_object format carries no schema and no tools")
    elif fmt.kind == JSON_SCHEMA:
        if fmt.tools:
            raise BadRequestError("a json_schema format carries no tools")
        _check_one(fmt.schema, "the JSON schema", _Budget())
    elif fmt.kind == TOOLS:
        _check_tools(fmt)
    else:
        raise BadRequestError(f"unknown output format {fmt.kind[:40]!r}")


def _check_one(text: str, where: str, budget: _Budget) -> None:
    schema = _load(text, where)
    _check_schema(schema, where, budget)
    _check_refs(schema, where)


def _check_tools(fmt: Format) -> None:
    if not 1 <= len(fmt.tools) <= MAX_TOOLS:
        raise BadRequestError(f"a tools format carries 1 to {MAX_TOOLS} tools")
    budget = _Budget()
    budget.spend("the tools", alternatives=len(fmt.tools))
    if fmt.schema:
        if fmt.tool_choice != "auto":
            raise BadRequestError("a tools format has a schema only under tool_choice auto")
        _check_one(fmt.schema, "the JSON schema", budget)
    names = [t.name for t in fmt.tools]
    if len(set(names)) != len(names) or not all(TOOL_NAME.fullmatch(n) for n in names):
        raise BadRequestError("tool names are distinct, 1-64 of A-Z a-z 0-9 _ -")
    if fmt.tool_choice not in CHOICES and fmt.tool_choice not in names:
        raise BadRequestError("tool_choice is auto, required or the name of a tool")
    for tool in fmt.tools:
        _check_one(tool.parameters, f"the parameters of {tool.name}", budget)


def _load(text: str, where: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:  # (nesting past the parser's stack)
        raise BadRequestError(f"{where} is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise BadRequestError(f"{where} must be a JSON object")
    return value


class _Budget:
    """What one format's schemas may add up to, all of them together: the
    converter's time grows with nodes and alternatives (its rule naming
    probes are quadratic in same-named properties), and llama.cpp's grammar
    stacks with alternatives that share a prefix."""

    def __init__(self) -> None:
        self.nodes = 0
        self.alternatives = 0

    def spend(self, where: str, *, nodes: int = 0, alternatives: int = 0) -> None:
        self.nodes += nodes
        self.alternatives += alternatives
        if self.nodes > MAX_NODES or self.alternatives > MAX_ALTERNATIVES:
            raise BadRequestError(
                f"{where}: the format's schemas exceed {MAX_NODES} subschemas or "
                f"{MAX_ALTERNATIVES} alternatives (enum, anyOf, oneOf) in all"
            )


def _check_schema(node: Any, where: str, budget: _Budget, depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise BadRequestError(f"{where} nests deeper than {MAX_DEPTH}")
    if isinstance(node, list):
        for item in node:
            _check_schema(item, where, budget, depth + 1)
        return
    if not isinstance(node, dict):
        return
    budget.spend(where, nodes=1)
    for key, value in node.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            if len(value) > MAX_PROPERTIES or any(len(k) > MAX_NAME for k in value):
                raise BadRequestError(
                    f"{where}: at most {MAX_PROPERTIES} {key}, names of {MAX_NAME} characters"
                )
            for schema in value.values():
                _check_schema(schema, where, budget, depth + 1)
            continue
        if key in _UNENFORCED:
            raise BadRequestError(f"{where}: {key} cannot be enforced by a grammar here")
        if key in _COUNTS and not (
            isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT
        ):
            raise BadRequestError(f"{where}: {key} must be a whole number from 0 to {MAX_COUNT}")
        if key in _ALTERNATIVES and isinstance(value, list):
            budget.spend(where, alternatives=len(value))
        if key == "pattern":
            _check_pattern(value, where)
        if key == "$ref" and not (isinstance(value, str) and _LOCAL_REF.fullmatch(value)):
            raise BadRequestError(f"{where}: $ref names #/$defs/<name> or #/definitions/<name>")
        _check_schema(value, where, budget, depth + 1)


def _check_pattern(value: object, where: str) -> None:
    """A pattern's length and every ``{...}`` in it: the converter writes each
    repetition out, so each is bounded (and any brace it would read as one)."""
    if not isinstance(value, str) or len(value) > MAX_PATTERN:
        raise BadRequestError(f"{where}: a pattern is a string of at most {MAX_PATTERN} characters")
    for inside in re.findall(r"\{([^}]*)\}", value):
        counts = _REPEAT.fullmatch(inside)
        if counts is None or any(int(n) > MAX_COUNT for n in counts.groups() if n):
            raise BadRequestError(f"{where}: a pattern repeats more than {MAX_COUNT} times")


def _check_refs(schema: dict[str, Any], where: str) -> None:
    """No definition may refer back to itself, directly or through others."""
    defs: dict[str, Any] = {}
    for key in ("$defs", "definitions"):
        if isinstance(schema.get(key), dict):
            defs.update({f"#/{key}/{name}": sub for name, sub in schema[key].items()})
    edges = {name: set(_refs_in(sub)) for name, sub in defs.items()}
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in path:
            raise BadRequestError(f"{where}: recursive $ref ({name}) is not served")
        if name in done:
            return
        for nxt in edges.get(name, ()):
            visit(nxt, (*path, name))
        done.add(name)

    for name in edges:
        visit(name, ())


def _refs_in(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for v in node.values() for r in _refs_in(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs_in(v)]
    return []


def gbnf_of(fmt: Format) -> str:
    """The grammar (GBNF, root rule ``root``) that answers in ``fmt`` obey.

    Raises :class:`BadRequestError` for a format out of bounds or a schema the
    converter cannot express.
    """
    check(fmt)
    if fmt.kind == JSON_OBJECT:
        return _convert([({"type": "object"}, "")])
    if fmt.kind == JSON_SCHEMA:
        return _convert([(json.loads(fmt.schema), "")])
    tools = [t for t in fmt.tools if fmt.tool_choice in CHOICES or t.name == fmt.tool_choice]
    call = {
        "oneOf": [
            {
                "type": "object",
                "properties": {"name": {"const": t.name}, "arguments": json.loads(t.parameters)},
                "required": ["name", "arguments"],
            }
            for t in tools
        ]
    }
    one = f"{_literal(CALL_OPEN)} call {_literal(CALL_CLOSE)}"
    calls = f"{one} ({_literal(CALL_GAP)} {one})*" if fmt.parallel else one
    rules = [f"p2p-calls ::= {calls}"]
    schemas = [(call, "call")]
    if fmt.tool_choice != "auto":
        rules.append("root ::= p2p-calls")
    elif fmt.schema:
        # The answer when it calls nothing: JSON of the requested schema.
        schemas.append((json.loads(fmt.schema), "p2p-answer"))
        rules.append("root ::= p2p-calls | p2p-answer")
    else:
        # Prose is anything that does not start as a call would.
        rules += ["root ::= p2p-calls | p2p-prose", r"p2p-prose ::= [^<\x00] [^\x00]*"]
    return _bounded(_convert(schemas).rstrip("\n") + "\n" + "\n".join(rules) + "\n")


def _literal(text: str) -> str:
    return json.dumps(text)


def _convert(schemas: list[tuple[Any, str]]) -> str:
    """One grammar with a rule for each (schema, rule name); "" names the root."""
    grammar = native.llama_cpp().llama_grammar
    converter = grammar.SchemaConverter(
        prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False
    )
    try:
        for schema, name in schemas:
            converter.visit(converter.resolve_refs(schema, "input"), name)
        return _bounded(str(converter.format_grammar()))
    except BadRequestError:
        raise
    except Exception as exc:  # noqa: BLE001 - the converter raises whatever it meets
        raise BadRequestError(f"the schema cannot be turned into a grammar: {exc}") from exc


def _bounded(text: str) -> str:
    if len(text) > MAX_GRAMMAR_CHARS:
        raise BadRequestError(f"the output format's grammar exceeds {MAX_GRAMMAR_CHARS} characters")
    return text
