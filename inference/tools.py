"""Tool calls as text: how tools are shown to a model and how its calls read back.

The convention is the Hermes/Qwen one that many chat templates already speak
(docs/protocols.md#output-formats): the tools are listed as JSON in a system
message, a call is a JSON object between tags, and a tool's result goes back
to the model as a user turn between tags::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

    <tool_response>
    {"temperature": 21}
    </tool_response>

The shim turns an API's tools and tool history into plain chat turns with
these (so a provider of any version renders them with its model's own chat
template), and a grammar (``inference/grammar.py``) holds the answer to the
call syntax, so the calls parse. :class:`CallReader` reads them back as they
stream.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final

from p2pnode.inference.engine import ChatMessage

CALL_OPEN: Final = "<tool_call>\n"
CALL_CLOSE: Final = "\n</tool_call>"
CALL_GAP: Final = "\n"
"""Between two calls of one answer."""

_TOOLS_PROMPT: Final = """\
You are a function calling AI model. You may call one or more functions to assist \
with the user query. You are provided with function signatures within <tools></tools> \
XML tags:
<tools>
{tools}
</tools>
For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""

_HEAD: Final = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\S)')
# What may follow a call's arguments before CALL_CLOSE: the call object's
# own closing brace, with the grammar's optional spaces.
_TAIL_HOLD: Final = len(CALL_CLOSE) + 3
# The longest head ({"name": "<64 characters>", "arguments": ) with room for
# the grammar's spaces; a stranger's text that is no head by then is no call.
_MAX_HEAD: Final = 160
TOOL_NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""What a tool's name may be (OpenAI's rule); a format's tools are checked against it."""


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A function as an API describes it."""

    name: str
    description: str
    parameters: dict[str, Any]

    def shown(self) -> str:
        """Its line in the system message's tool list (OpenAI's tool object)."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return json.dumps({"type": "function", "function": function}, ensure_ascii=False)


def with_tools(messages: tuple[ChatMessage, ...], tools: list[ToolSpec]) -> tuple[ChatMessage, ...]:
    """``messages`` with ``tools`` listed in the system message (one is added if none leads)."""
    listing = _TOOLS_PROMPT.format(tools="\n".join(t.shown() for t in tools))
    if messages and messages[0].role == "system":
        first = ChatMessage(role="system", content=messages[0].content + "\n\n" + listing)
        return (first, *messages[1:])
    return (ChatMessage(role="system", content=listing), *messages)


def call_text(name: str, arguments: str) -> str:
    """A call as the model writes it (``arguments``: JSON text, kept as is when it is not JSON)."""
    try:
        value: Any = json.loads(arguments)
    except ValueError:
        value = arguments
    body = json.dumps({"name": name, "arguments": value}, ensure_ascii=False)
    return CALL_OPEN + body + CALL_CLOSE


def calls_text(content: str, calls: list[tuple[str, str]]) -> str:
    """An assistant turn that made ``calls`` (name, arguments), after its ``content``."""
    written = CALL_GAP.join(call_text(name, arguments) for name, arguments in calls)
    return f"{content}\n{written}" if content else written


def results_text(results: list[str]) -> str:
    """Tool results as the user turn that hands them to the model."""
    return "\n".join(f"<tool_response>\n{r}\n</tool_response>" for r in results)


@dataclass(frozen=True, slots=True)
class CallStart:
    """A call's name is known: the first thing a stream says of it."""

    index: int
    name: str


@dataclass(frozen=True, slots=True)
class CallArguments:
    """More of a call's arguments (JSON text, in pieces)."""

    index: int
    text: str


@dataclass(frozen=True, slots=True)
class Prose:
    """Text that is not a call (an answer under tool_choice auto)."""

    text: str


Event = CallStart | CallArguments | Prose


class CallReader:
    """Reads an answer's tool calls as its text arrives.

    An answer under a tools grammar is either calls from its first
    character, or prose that never starts with ``<``. Arguments are handed
    on in pieces, held back only as far as the call's closing brace and tag
    might reach. The work is linear in the text however it is cut: a
    provider's text is a stranger's, and one that does not read as calls
    (a head that never comes, a name that is no tool name, text between
    calls) ends the reading; the calls read whole until then stand.
    """

    def __init__(self) -> None:
        self._prose: bool | None = None
        self._broken = False
        self._calls: list[tuple[str, str]] = []  # finished (name, arguments)
        self._expect = CALL_OPEN  # the literal text that must come next
        self._head = ""  # the current call's text until its arguments start
        self._name = ""
        self._args: list[str] = []  # its arguments as handed on
        self._held = ""  # text after them not handed on yet (may be the close)
        self._in_args = False

    @property
    def calls(self) -> list[tuple[str, str]]:
        """The calls read to the end so far: (name, arguments JSON text)."""
        return list(self._calls)

    @property
    def is_prose(self) -> bool:
        return bool(self._prose)

    def feed(self, text: str) -> list[Event]:
        """What ``text`` (the next part of the answer) tells."""
        if self._prose is None and text:
            self._prose = not text.startswith("<")
        if self._prose:
            return [Prose(text)] if text else []
        events: list[Event] = []
        while text and not self._broken:
            text = self._step(text, events)
        return events

    def end(self) -> list[Event]:
        """What is left once the answer is complete (arguments held back, for one)."""
        events: list[Event] = []
        if self._in_args and not self._broken:
            # Cut short (out of tokens): a call whose JSON is whole counts,
            # even when its closing tag never came.
            held = self._held
            text = held[: len(held) - _partial_close(held)]
            if _whole_call("".join(self._args) + text):
                self._close(text, events)
            elif held:
                events.append(CallArguments(len(self._calls), held))
                self._args.append(held)
            self._held = ""
        return events

    def _step(self, text: str, events: list[Event]) -> str:
        """Read what ``text`` can tell in the current state; returns what is left."""
        if self._expect:
            n = min(len(text), len(self._expect))
            if text[:n] != self._expect[:n]:
                self._broken = True
                return ""
            self._expect = self._expect[n:]
            return text[n:]
        if not self._in_args:
            self._head += text
            head = _HEAD.match(self._head)
            if head is None:
                if len(self._head) > _MAX_HEAD:
                    self._broken = True
                return ""
            try:
                name = json.loads(f'"{head.group(1)}"')
            except ValueError:
                name = ""
            if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
                self._broken = True
                return ""
            self._name, self._in_args = name, True
            events.append(CallStart(len(self._calls), name))
            rest, self._head = self._head[head.end() :], ""
            return rest
        held = self._held + text
        close = held.find(CALL_CLOSE)
        if close < 0:
            keep = min(len(held), _TAIL_HOLD)
            piece, self._held = held[: len(held) - keep], held[len(held) - keep :]
            if piece:
                self._args.append(piece)
                events.append(CallArguments(len(self._calls), piece))
            return ""
        self._held = ""
        self._close(held[:close], events)
        self._expect = CALL_GAP + CALL_OPEN
        return held[close + len(CALL_CLOSE) :]

    def _close(self, tail: str, events: list[Event]) -> None:
        """The current call ends with ``tail`` (its text before the closing tag)."""
        sent = "".join(self._args)
        arguments = _arguments(sent + tail)
        if len(arguments) > len(sent):
            events.append(CallArguments(len(self._calls), arguments[len(sent) :]))
        self._calls.append((self._name, arguments))
        self._args, self._in_args = [], False


def _arguments(text: str) -> str:
    """A call's arguments, from its text between ``"arguments":`` and the closing tag."""
    text = text.rstrip()
    return text[:-1].rstrip() if text.endswith("}") else text  # the call object's own brace


def _whole_call(text: str) -> bool:
    """Whether ``text`` (as :func:`_arguments` takes it) ends a call with whole JSON arguments."""
    if not text.rstrip().endswith("}"):
        return False
    try:
        json.loads(_arguments(text))
    except (ValueError, RecursionError):
        return False
    return True


def _partial_close(text: str) -> int:
    """How many characters at the end of ``text`` begin a closing tag."""
    for n in range(len(CALL_CLOSE) - 1, 0, -1):
        if text.endswith(CALL_CLOSE[:n]):
            return n
    return 0


def read_calls(text: str) -> list[tuple[str, str]] | None:
    """The calls a whole answer makes, or None when it is prose or not whole calls."""
    reader = CallReader()
    reader.feed(text)
    reader.end()
    if reader.is_prose or not reader.calls:
        return None
    for _, arguments in reader.calls:
        try:
            json.loads(arguments)
        except (ValueError, RecursionError):
            return None
    return reader.calls
