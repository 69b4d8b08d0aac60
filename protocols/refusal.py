"""A provider's "no" to a session or a request: an outcome the caller acts on, not an error.

A provider that is busy, rate-limits us, has no such model, or will not
serve us says so: the handshake answers ``Reject`` (a :class:`RejectCode`),
an infer stream ``Error`` (an :class:`ErrorCode`). Both come back from
``protocols/session/service.py:open_session`` and
``protocols/infer/service.py:request`` as a :class:`Refusal` value, and the
consumer matches on its code (docs/architecture.md#failover). Exceptions stay
for what no caller plans for: a broken stream, a timeout, a protocol
violation.
"""

from __future__ import annotations

from dataclasses import dataclass

from p2pnode.errors import ErrorCode
from p2pnode.protocols.session.messages import RejectCode


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a provider did not open a session (``RejectCode``) or serve a request (``ErrorCode``).

    The two enums are distinct types, so a match on the member also says
    which step refused. A code this version does not know stays an ``int``.
    """

    code: RejectCode | ErrorCode | int
    reason: str = ""
    # The session was refused (a Reject), else a request on it (an Error):
    # said outright, since a code this version does not know has no enum.
    session: bool = False

    @classmethod
    def of_session(cls, code: int, reason: str) -> Refusal:
        """A handshake's Reject."""
        known = code in RejectCode._value2member_map_
        return cls(RejectCode(code) if known else code, reason, session=True)

    @classmethod
    def of_request(cls, code: int, reason: str) -> Refusal:
        """An infer stream's Error."""
        known = code in ErrorCode._value2member_map_
        return cls(ErrorCode(code) if known else code, reason, session=False)

    def is_one_of(self, *codes: RejectCode | ErrorCode) -> bool:
        """Whether the code is one of ``codes``, by identity: the two enums share
        values (``ErrorCode.MALFORMED == RejectCode.UNKNOWN_MODEL == 1``), so
        ``in`` or ``==`` would mix them up."""
        return any(self.code is code for code in codes)

    def __str__(self) -> str:
        code = self.code
        name = code.name.lower() if isinstance(code, RejectCode | ErrorCode) else f"code {code}"
        what = "session rejected" if self.session else "provider refused"
        return f"{what}: {name} {self.reason}".rstrip()
