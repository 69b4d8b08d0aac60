"""Answers held to an output format: JSON, a JSON schema, tool calls (real llama.cpp)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from p2pnode.errors import BadRequestError
from p2pnode.inference import grammar, tools
from p2pnode.inference.audit import ImpossibleAnswer
from p2pnode.inference.engine import (
    JSON_OBJECT,
    JSON_SCHEMA,
    TOOLS,
    ChatMessage,
    Format,
    Params,
    Request,
    Tool,
    collect,
)
from p2pnode.inference.llamacpp import (
    BUNDLED_MODEL_ID,
    Config,
    LlamaCppEngine,
    bundled_model_path,
    open_llamacpp,
)

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer"},
    },
    "required": ["city", "unit", "days"],
}
WEATHER_TOOL = Tool(name="get_weather", parameters=json.dumps(WEATHER))
TIME_TOOL = Tool(
    name="get_time",
    parameters=json.dumps(
        {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}
    ),
)


def ask(text: str, fmt: Format | None, **params: object) -> Request:
    p = Params(**{"max_tokens": 80, "temperature": 0.0, "seed": 3, "format": fmt, **params})  # type: ignore[arg-type]
    messages = (ChatMessage(role="user", content=text),)
    return Request(model_id=BUNDLED_MODEL_ID, kind="chat", messages=messages, params=p)


def schema_format(schema: dict[str, object]) -> Format:
    return Format(kind=JSON_SCHEMA, schema=json.dumps(schema))


def nest(depth: int) -> dict[str, object]:
    node: dict[str, object] = {"type": "string"}
    for _ in range(depth):
        node = {"type": "array", "items": node}
    return node


@pytest.fixture
async def engine() -> AsyncIterator[LlamaCppEngine]:
    cfg = Config(model_path=bundled_model_path(), model_id=BUNDLED_MODEL_ID, n_threads=1)
    async with open_llamacpp(cfg) as e:
        yield e


def valid(value: object, schema: dict[str, object]) -> bool:
    import jsonschema

    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError:
        return False
    return True


@pytest.mark.slow
async def test_a_json_schema_answer_is_json_of_that_schema(engine: LlamaCppEngine) -> None:
    plain, _ = await collect(engine, ask("What is the weather in Paris?", None))
    assert not plain.lstrip().startswith("{")  # left to itself, the model writes prose
    fmt = Format(kind=JSON_SCHEMA, schema=json.dumps(WEATHER))
    text, last = await collect(engine, ask("What is the weather in Paris?", fmt, max_tokens=60))
    assert last.finish_reason == "stop"
    assert valid(json.loads(text), WEATHER), text


@pytest.mark.slow
async def test_a_json_object_answer_is_an_object(engine: LlamaCppEngine) -> None:
    text, _ = await collect(engine, ask("Describe a cat.", Format(kind=JSON_OBJECT)))
    # A 135M model may run out of tokens inside a string; what it wrote is
    # still an object's beginning, never prose.
    assert text.startswith("{")


@pytest.mark.slow
@pytest.mark.parametrize("choice", ["required", "get_time"])
async def test_a_tool_answer_is_calls_whose_arguments_fit_their_schema(
    engine: LlamaCppEngine, choice: str
) -> None:
    fmt = Format(kind=TOOLS, tools=(WEATHER_TOOL, TIME_TOOL), tool_choice=choice, parallel=False)
    request = ask("What is the weather in Paris for 3 days?", fmt)
    listed = [
        tools.ToolSpec(t.name, "", json.loads(t.parameters)) for t in (WEATHER_TOOL, TIME_TOOL)
    ]
    request = replace(request, messages=tools.with_tools(request.messages, listed))
    text, last = await collect(engine, request)
    calls = tools.read_calls(text)
    ((name, arguments),) = calls or [("", "")]
    if choice != "required":
        assert name == choice
    schema = json.loads(next(t for t in fmt.tools if t.name == name).parameters)
    assert valid(json.loads(arguments), schema), arguments
    assert last.finish_reason == "stop"


@pytest.mark.slow
async def test_a_token_the_grammar_forbids_is_impossible(engine: LlamaCppEngine) -> None:
    request = ask(
        "What is the weather in Rome?", Format(kind=JSON_SCHEMA, schema=json.dumps(WEATHER))
    )
    with pytest.raises(ImpossibleAnswer, match="output format"):
        await engine.score(request, engine.tokenize("Sunny"))  # prose where JSON must be


@pytest.mark.slow
async def test_a_continuation_goes_on_under_the_grammar(engine: LlamaCppEngine) -> None:
    fmt = Format(kind=JSON_SCHEMA, schema=json.dumps(WEATHER))
    request = ask("Weather in Oslo?", fmt, max_tokens=60)
    ids: list[int] = []
    async with engine.stream(request) as chunks:
        async for chunk in chunks:
            ids.extend(chunk.token_ids)
    whole = engine.text_of(ids)
    head = engine.text_of(ids[:6])  # a failover after 6 tokens
    request = replace(request, continuation=head)
    rest, _ = await collect(engine, request)
    assert head + rest == whole
    assert valid(json.loads(whole), WEATHER)
    with pytest.raises(BadRequestError, match="does not fit"):
        await collect(engine, replace(request, continuation="Sunny"))


@pytest.mark.slow
async def test_a_bad_format_is_refused_before_any_slot_work(engine: LlamaCppEngine) -> None:
    fmt = Format(kind=JSON_SCHEMA, schema=json.dumps({"type": "array", "maxItems": 10**9}))
    with pytest.raises(BadRequestError, match="maxItems"):
        async with engine.stream(ask("x", fmt)):
            pass
    assert engine.slots_free == engine.slots_total


@pytest.mark.parametrize(
    ("fmt", "says"),
    [
        (Format(kind="xml"), "unknown output format"),
        (Format(kind=JSON_SCHEMA, schema="[1]"), "JSON object"),
        (Format(kind=JSON_SCHEMA, schema="{"), "not JSON"),
        (
            Format(kind=JSON_SCHEMA, schema=json.dumps({"type": "string", "maxLength": 129})),
            "maxLength",
        ),
        (
            Format(kind=JSON_SCHEMA, schema=json.dumps({"type": "string", "pattern": "a{1,5000}"})),
            "pattern",
        ),
        (Format(kind=JSON_SCHEMA, schema=json.dumps({"$ref": "https://x.example/s.json"})), "$ref"),
        (Format(kind=JSON_SCHEMA, schema=json.dumps(nest(40))), "deeper"),
        (Format(kind=JSON_SCHEMA, schema=json.dumps({"x": "y" * 40_000})), "characters"),
        (Format(kind=TOOLS), "1 to"),
        (Format(kind=TOOLS, tools=(replace(WEATHER_TOOL, name="a b"),)), "tool names"),
        (Format(kind=TOOLS, tools=(WEATHER_TOOL, WEATHER_TOOL)), "tool names"),
        (Format(kind=TOOLS, tools=(WEATHER_TOOL,), tool_choice="other"), "tool_choice"),
        (Format(kind=TOOLS, tools=(WEATHER_TOOL,), schema="{}"), "only under tool_choice auto"),
        (Format(kind=JSON_OBJECT, schema="{}"), "no schema"),
        (schema_format({"type": "string", "minLength": -(10**8), "maxLength": 1}), "minLength"),
        (schema_format({"type": "array", "maxItems": True}), "maxItems"),
        (schema_format({"type": "string", "pattern": "^a{,100000000}$"}), "pattern"),
        (schema_format({"type": "string", "pattern": "^a{1_000_000}$"}), "pattern"),
        (schema_format({"$defs": {"type": "array"}, "$ref": "#/$defs"}), "$ref"),
        (
            schema_format({"$defs": {"n": {"items": {"$ref": "#/$defs/n"}}}, "$ref": "#/$defs/n"}),
            "recursive",
        ),
        (schema_format({"enum": list(range(300))}), "alternatives"),
        (schema_format({"properties": {f"p{i}": {} for i in range(129)}}), "at most 128"),
        # Past the JSON parser's stack, or parsed (a raised recursion limit)
        # and refused for its nesting: refused either way, never an error.
        (
            Format(kind=JSON_SCHEMA, schema='{"a": ' + "[" * 15_000 + "]" * 15_000 + "}"),
            "JSON|deeper",
        ),
        (
            Format(kind=JSON_SCHEMA, schema=json.dumps({"type": "integer", "minimum": 1})),
            "minimum cannot be enforced",
        ),
        (
            Format(
                kind=JSON_SCHEMA,
                schema=json.dumps({"properties": {"x": {"type": "array", "uniqueItems": True}}}),
            ),
            "uniqueItems",
        ),
    ],
)
def test_formats_out_of_bounds_are_refused(fmt: Format, says: str) -> None:
    with pytest.raises(BadRequestError, match="|".join(re.escape(s) for s in says.split("|"))):
        grammar.check(fmt)


@pytest.mark.slow
async def test_a_grammar_too_costly_to_follow_is_given_up_within_a_second_or_so(
    engine: LlamaCppEngine,
) -> None:
    # Alternatives that share their start, nested through definitions: no
    # bound on the schema rules it out, and llama.cpp's stacks grow about 4x
    # per "[" (measured 56 s for one step at depth 15).
    defs: dict[str, object] = {"d20": {"type": "integer"}}
    for i in range(20):
        deeper = {"$ref": f"#/$defs/d{i + 1}"}
        defs[f"d{i}"] = {
            "anyOf": [
                {"type": "array", "prefixItems": [deeper]},
                {"type": "array", "prefixItems": [deeper, {"type": "integer"}]},
                {"type": "integer"},
            ]
        }
    schema = {"$defs": defs, "type": "object", "properties": {"v": {"$ref": "#/$defs/d0"}}}
    request = replace(ask("hi", schema_format(schema)), continuation='{"v": ' + "[" * 18)
    started = time.monotonic()
    with pytest.raises(BadRequestError, match="too costly"):
        await collect(engine, request)
    assert time.monotonic() - started < 10
    assert engine.slots_free == engine.slots_total


def test_property_names_are_not_taken_for_keywords() -> None:
    schema = {"type": "object", "properties": {"minimum": {"type": "integer"}, "not": {}}}
    grammar.check(Format(kind=JSON_SCHEMA, schema=json.dumps(schema)))


def test_an_unexpressible_schema_is_refused_with_the_converter_s_reason() -> None:
    fmt = Format(kind=JSON_SCHEMA, schema=json.dumps({"$ref": "#/definitions/missing"}))
    with pytest.raises(BadRequestError, match="cannot be turned into a grammar"):
        grammar.gbnf_of(fmt)


def test_calls_are_read_back_in_pieces_as_they_stream() -> None:
    text = (
        tools.calls_text(
            "", [("get_weather", '{"city": "Paris", "days": 2}'), ("get_time", "{}")]
        ).replace("}}", "} } ")  # the grammar's optional spaces
    )
    for step in (1, 3, 7, len(text)):
        reader = tools.CallReader()
        events: list[tools.Event] = []
        for at in range(0, len(text), step):
            events += reader.feed(text[at : at + step])
        events += reader.end()
        starts = [e for e in events if isinstance(e, tools.CallStart)]
        assert [(s.index, s.name) for s in starts] == [(0, "get_weather"), (1, "get_time")]
        pieces = {
            i: "".join(
                e.text for e in events if isinstance(e, tools.CallArguments) and e.index == i
            )
            for i in (0, 1)
        }
        assert json.loads(pieces[0]) == {"city": "Paris", "days": 2}
        assert pieces[1] == "{}"
        assert reader.calls == [("get_weather", pieces[0]), ("get_time", "{}")]
    # Out of tokens in the closing tag: the call is whole all the same; a
    # second call cut inside its arguments is not one.
    cut = tools.calls_text("", [("get_time", '{"zone": "UTC"}')])[:-3]
    assert tools.read_calls(cut) == [("get_time", '{"zone": "UTC"}')]
    cut = tools.calls_text("", [("get_time", '{"zone": "UTC"}'), ("get_time", '{"zone": "CET"}')])
    assert tools.read_calls(cut[:-20]) == [("get_time", '{"zone": "UTC"}')]
    prose = tools.CallReader()
    assert prose.feed("Sunny") == [tools.Prose("Sunny")]
    assert prose.end() == []
    assert tools.read_calls("Sunny <tool_call>") is None


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>\n{"name": "' + "a" * 50_000,  # a head that never ends
        '<tool_call>\n{"name": "\\x", "arguments": {}}\n</tool_call>',  # no JSON string
        '<tool_call>\n{"name": "a b", "arguments": {}}\n</tool_call>',  # no tool name
        "<tool_cal>\n",  # not the tag
    ],
)
def test_a_strangers_text_that_is_no_call_is_read_as_none_at_once(text: str) -> None:
    # Fed a character at a time, as a hostile provider may send it: the
    # reading stays linear, raises nothing and finds no call.
    reader = tools.CallReader()
    for char in text:
        reader.feed(char)
    reader.end()
    assert reader.calls == []
    assert tools.read_calls(text) is None


def test_long_arguments_fed_a_character_at_a_time_stay_linear() -> None:
    body = '{"text": "' + "x" * 60_000 + '"}'
    text = tools.calls_text("", [("get_time", body)])
    reader = tools.CallReader()
    pieces = [e for char in text for e in reader.feed(char)] + reader.end()
    arguments = "".join(e.text for e in pieces if isinstance(e, tools.CallArguments))
    assert json.loads(arguments) == json.loads(body)
    assert reader.calls == [("get_time", arguments)]
