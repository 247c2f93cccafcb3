"""`thalex-tp halt|resume|close-all` wait for take-profit's answer; a refusal is never a success.

Take-profit runs in the test's event loop against a real Redis; the CLI runs in a thread, exactly
as a user runs it (`services.cli.main`), and its exit code and output are checked.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from redis.asyncio import Redis

from services.cli import main
from services.common.config import Settings
from services.common.contracts import (
    Command,
    Control,
    ControlAction,
    ControlAnswer,
    ControlOutcome,
    Report,
    ReportStatus,
    halt_from_hash,
)
from services.common.streams import Names
from services.operator import EXIT_REFUSED, EXIT_UNANSWERED
from services.takeprofit.app import build
from tests.support import eventually, in_process, read_stream, settings_for, write_config, xadd
from tests.takeprofit.factories import pos, snap

Capture = pytest.CaptureFixture[str]
TP = {"partial_close_fraction": 0.0, "cooldown_seconds": 0.5, "check_interval_seconds": 1.0}


def live(seq: int, net_after_close: float, **kwargs: object) -> object:
    now = time.time()
    return snap(seq, net_after_close, ts=now, oldest=now, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def settings(redis_url: str, names: Names, tmp_path: Path) -> Settings:
    key = tmp_path / "command_key.txt"  # take-profit signs every command (issue 21)
    key.write_text("ab" * 32 + "\n")
    key.chmod(0o600)
    return settings_for(redis_url, names, portfolio_take_profit=TP, commands={"signing_key_file": str(key)})


@pytest.fixture
def config(settings: Settings, tmp_path: Path) -> Path:
    return write_config(tmp_path / "tp.toml", settings)


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run `thalex-tp ARGV` in a thread (it blocks while it waits for the answer)."""
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def answers(redis: Redis, names: Names) -> list[ControlAnswer]:
    return await read_stream(redis, names.control_answers, ControlAnswer)


async def test_close_all_refused_with_nothing_to_close_exits_3_and_says_why(
        settings: Settings, config: Path, redis: Redis, names: Names, capsys: Capture) -> None:
    """The reported case: close-all right after a take-profit, the account flat -> `no_positions`."""
    async with in_process(build, settings, "takeprofit"):
        await xadd(redis, names.snapshots, live(1, 0.0, positions=[]))
        await asyncio.sleep(0.3)
        code, out, err = await cli(capsys, "close-all", "--yes", "--config", str(config))
    assert code == EXIT_REFUSED, (out, err)
    assert "REFUSED by take-profit (no_positions): there is no open position to close" in err
    assert "Nothing was done" in err and "accepted" not in out
    [answer] = await answers(redis, names)
    assert answer.outcome is ControlOutcome.REFUSED and answer.reason == "no_positions"
    assert await read_stream(redis, names.commands, Command) == []


async def test_close_all_before_any_snapshot_is_refused(
        settings: Settings, config: Path, redis: Redis, names: Names, capsys: Capture) -> None:
    async with in_process(build, settings, "takeprofit"):
        code, _, err = await cli(capsys, "close-all", "--yes", "--config", str(config))
    assert code == EXIT_REFUSED and "(no_snapshot)" in err and "is portfolio running" in err


async def test_close_all_accepted_names_the_command_and_a_second_one_is_refused(
        settings: Settings, config: Path, redis: Redis, names: Names, capsys: Capture) -> None:
    async with in_process(build, settings, "takeprofit"):
        await xadd(redis, names.snapshots, live(1, 0.3, positions=[pos("BTC-PERPETUAL", 0.5)]))
        await asyncio.sleep(0.3)
        code, out, err = await cli(capsys, "close-all", "--yes", "--config", str(config))
        assert code == 0, err
        [command] = await read_stream(redis, names.commands, Command)
        assert command.reason == "manual"
        assert f"accepted by take-profit: closing every position: command {command.command_id}" in out
        assert "thalex-tp history" in out
        code, _, err = await cli(capsys, "close-all", "--yes", "--config", str(config))
        assert code == EXIT_REFUSED and "(closure_in_flight)" in err
        # history lists the decision and the refusal, oldest first
        code, out, _ = await cli(capsys, "history", "--config", str(config))
        assert code == 0
        lines = out.strip().splitlines()
        assert command.command_id in lines[0] and "manual" in lines[0]
        assert "close_all" in lines[1] and "REFUSED (closure_in_flight)" in lines[1]
        code, out, _ = await cli(capsys, "history", "--json", "--config", str(config))
        rows = json.loads(out)
        assert [r["kind"] for r in rows] == ["decision", "refused"]
        assert rows[1]["reason"] == "closure_in_flight" and rows[1]["action"] == "close_all"
        code, out, _ = await cli(capsys, "history", "-n", "1", "--json", "--config", str(config))
        assert [r["kind"] for r in json.loads(out)] == ["refused"]


async def test_halt_and_resume_are_answered_and_resume_lifts_a_failed_closure(
        settings: Settings, config: Path, redis: Redis, names: Names, capsys: Capture) -> None:
    async with in_process(build, settings, "takeprofit"):
        code, out, err = await cli(capsys, "halt", "--config", str(config))
        assert code == 0, err
        assert "accepted by take-profit: operator halt set" in out
        halt = halt_from_hash(await redis.hgetall(names.halt))
        assert halt is not None and halt.reason == "operator_halt"
        code, out, _ = await cli(capsys, "resume", "--config", str(config))
        assert code == 0 and "operator halt lifted; quoters may trade" in out
        # a closure that fails keeps quoters halted until resume, which says it lifted that too
        await xadd(redis, names.snapshots, live(1, 2.0))
        command = await _one_command(redis, names)
        await xadd(redis, names.reports, Report(command_id=command.command_id, status=ReportStatus.FAILED,
                                                epoch=1, fraction=1.0, ts=time.time()))

        async def failed_halt() -> bool:
            halt = halt_from_hash(await redis.hgetall(names.halt))
            return halt is not None and halt.reason == "closure_failed"

        await eventually(failed_halt)
        code, out, _ = await cli(capsys, "resume", "--config", str(config))
        assert code == 0
        assert f"and the halt the failed closure {command.command_id} left" in out


async def _one_command(redis: Redis, names: Names) -> Command:
    async def one() -> bool:
        return len(await read_stream(redis, names.commands, Command)) == 1

    await eventually(one)
    return (await read_stream(redis, names.commands, Command))[0]


async def test_halt_with_take_profit_down_is_unanswered_and_exits_4(
        config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 21: `halt` said "halt requested" while nothing was halted."""
    started = time.monotonic()
    code, out, err = await cli(capsys, "halt", "--timeout", "0.5", "--config", str(config))
    assert code == EXIT_UNANSWERED
    assert time.monotonic() - started < 5
    assert "NO ANSWER from take-profit within 0.5 s" in err and "thalex-tp takeprofit" in err
    assert "halt requested" not in out and "accepted" not in out


async def test_a_close_all_older_than_a_minute_is_refused_as_expired(
        settings: Settings, redis: Redis, names: Names) -> None:
    """Sent while take-profit was down; it must not close everything by surprise when it starts."""
    old = Control(action=ControlAction.CLOSE_ALL, by="op@host", ts=time.time() - 120)
    late_halt = Control(action=ControlAction.HALT, by="op@host", ts=time.time() - 120)
    await xadd(redis, names.snapshots, live(1, 0.3, positions=[pos("BTC-PERPETUAL", 0.5)]))
    await xadd(redis, names.control, old)
    await xadd(redis, names.control, late_halt)
    async with in_process(build, settings, "takeprofit"):
        async def answered() -> bool:
            return len(await answers(redis, names)) == 2

        await eventually(answered)
    refused, halted = await answers(redis, names)
    assert refused.outcome is ControlOutcome.REFUSED and refused.reason == "expired"
    assert "not acted on" in refused.detail
    # standing down late is safe: a late halt is applied
    assert halted.outcome is ControlOutcome.ACCEPTED and halted.halt == "operator_halt"
    assert await read_stream(redis, names.commands, Command) == []


@pytest.mark.parametrize("argv", [["history", "-n", "0"], ["halt", "--timeout", "0"]])
async def test_bad_numbers_are_a_usage_error_not_a_crash(
        config: Path, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        await cli(capsys, *argv, "--config", str(config))
    assert exit_info.value.code == 2
    assert "must be" in capsys.readouterr().err
