"""A provider's refusal is a value whose code says which step refused."""

from __future__ import annotations

from p2pnode.errors import ErrorCode
from p2pnode.protocols.refusal import Refusal
from p2pnode.protocols.session.messages import RejectCode


def test_session_and_request_codes_are_never_mixed_up() -> None:
    # The two enums share values: 1 is MALFORMED and UNKNOWN_MODEL, 2 OVERSIZE and BUSY.
    assert ErrorCode.MALFORMED == RejectCode.UNKNOWN_MODEL
    busy_session = Refusal.of_session(int(RejectCode.BUSY), "no slot")
    oversize = Refusal.of_request(int(ErrorCode.OVERSIZE), "too big")
    assert busy_session.is_one_of(RejectCode.BUSY)
    assert not oversize.is_one_of(RejectCode.BUSY, ErrorCode.BUSY)
    assert busy_session.session
    assert not oversize.session
    assert str(busy_session) == "session rejected: busy no slot"
    assert str(oversize) == "provider refused: oversize too big"


def test_a_code_this_version_does_not_know_stays_a_number() -> None:
    unknown = Refusal.of_request(999, "from the future")
    assert unknown.code == 999
    assert not unknown.is_one_of(*ErrorCode, *RejectCode)
    assert str(unknown) == "provider refused: code 999 from the future"
    # A session refused with a new code is still a session refusal.
    rejected = Refusal.of_session(42, "new reason")
    assert rejected.session
    assert str(rejected) == "session rejected: code 42 new reason"
