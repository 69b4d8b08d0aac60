"""Log lines a machine can read: one JSON object a line, with the node and the
peer, session and request they concern (docs/architecture.md#logs).

The node a line comes from is a context variable: :func:`p2pnode.p2p.node.open_node`
sets it before it starts its tasks, and every task started after inherits it,
so the many nodes of one simnet process each stamp their own lines. The
event of a line is its call's message template (``"provider %s: %s"``): one
name for each kind of line, whatever the values.

What never reaches a line, at any level: prompts, outputs, API keys and
private keys. Nothing logs them (``tests/cli/test_cli.py`` runs a chat at
debug level and searches both nodes' logs).
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
from typing import Any, Final

NODE: Final = contextvars.ContextVar[str]("p2pnode_node", default="")
"""The peer id of the node whose task is running."""

FIELDS: Final = ("peer", "session", "request")
"""What a call may name with ``extra=``: the remote peer, a session id, a request id."""


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, event, message, node, the fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": str(record.msg),
            "message": record.getMessage(),
            "node": getattr(record, "node", "") or NODE.get(),
        }
        for field in FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                line[field] = value.hex() if isinstance(value, bytes) else str(value)
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The human form: time, level, logger, the node's short id, the message."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        node = NODE.get()
        return f"{text} [{node[-6:]}]" if node else text
