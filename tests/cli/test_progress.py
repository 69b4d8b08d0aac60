"""Progress: plain lines when stderr is not a terminal, a rich bar when it is."""

from __future__ import annotations

import pytest

from p2pnode.cli import progress


def test_lines_say_each_step_with_its_count(capsys: pytest.CaptureFixture[str]) -> None:
    with progress.progress("deploying", total=2, tty=False) as steps:
        steps.step("ComputeToken at 0xabc")
        steps.step(by=1)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("deploying [1/2, ")
    assert lines[0].endswith("s]: ComputeToken at 0xabc")
    assert lines[1].startswith("deploying [2/2, ")


def test_a_bar_counts_to_its_total_and_stops(capsys: pytest.CaptureFixture[str]) -> None:
    steps = progress.start("simnet: nodes started", 8, tty=True)
    steps.step(by=3)
    steps.step("the last wave", by=5)  # the last step ends the live line by itself
    err = capsys.readouterr().err
    assert "simnet: nodes started" in err
    assert "8/8" in err
    assert "the last wave" in err


def test_background_work_and_json_logs_say_it_through_the_log(
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level("INFO", logger="p2pnode.cli.progress")
    progress.start("loading models", 1, tty=False, background=True).step("m loaded")
    monkeypatch.setattr(progress, "LOGS_ONLY", True)
    progress.start("deploying", 1, tty=True).step("x")  # no bar, even on a terminal
    assert capsys.readouterr().err == ""
    assert [r.getMessage().split(" [")[0] for r in caplog.records] == [
        "loading models",
        "deploying",
    ]
