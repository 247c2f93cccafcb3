"""The notify service against a real Redis and real HTTP servers standing in for every target."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from services.common.config import Settings
from services.common.contracts import Command, Legs, Notification, PositionToClose
from services.common.service import Unhealthy
from services.common.streams import Names
from services.notify.app import build
from services.notify.outbox import Outbox
from tests.notify.servers import StandIn, wait_until
from tests.support import REPO, ServiceProcess, in_process, read_stream, settings_for, xadd

FAST = {"retry_max_seconds": 0.3, "health_urls": {}, "rate_per_minute": 600, "rate_burst": 20}


def secret(tmp_path: Path, name: str, value: str) -> str:
    path = tmp_path / name
    path.write_text(value + "\n")
    path.chmod(0o600)
    return str(path)


def webhook(name: str, server: StandIn, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "webhook", "url": f"{server.url}/hook", **extra}


def command(n: int, reason: str = "take_profit") -> Command:
    now = time.time()
    return Command(
        command_id=f"e1-{reason}-s{n}-n{n}",
        epoch=1,
        reason=reason,
        snapshot_seq=n,
        legs=Legs.of([PositionToClose(instrument="BTC-PERPETUAL", amount=0.5, mark=60000.0)]),
        net_pnl=1.12,
        threshold=1.1,
        created_ts=now,
        deadline_ts=now + 30,
    )


def notify_settings(redis_url: str, names: Names, targets: list[dict[str, Any]], **notify: Any) -> Settings:
    return settings_for(redis_url, names, notify={**FAST, **notify, "targets": targets})


async def test_every_kind_of_target_gets_the_decision_in_its_own_format(
    redis_url: str, names: Names, redis: Redis, tmp_path: Path
) -> None:
    servers = [await StandIn().start() for _ in range(5)]
    hook, telegram, slack, discord, picky = servers
    targets = [
        webhook("hook", hook, secret_file=secret(tmp_path, "hmac", "s3cret")),
        {
            "name": "phone",
            "type": "telegram",
            "base_url": telegram.url,
            "bot_token_file": secret(tmp_path, "token", "123:ABC"),
            "chat_id_file": secret(tmp_path, "chat", "-1001"),
        },
        {
            "name": "slack",
            "type": "slack",
            "url_file": secret(tmp_path, "slack", f"{slack.url}/services/T/B/X"),
        },
        {
            "name": "discord",
            "type": "discord",
            "url_file": secret(tmp_path, "discord", f"{discord.url}/api/webhooks/1/x"),
        },
        webhook("failures-only", picky, events=["closure_failed"]),
    ]
    try:
        async with in_process(build, notify_settings(redis_url, names, targets), "notify"):
            await xadd(redis, names.commands, command(1))
            await wait_until(lambda: all(s.received for s in servers[:4]), what="every target")
            await asyncio.sleep(0.5)
    finally:
        for server in servers:
            await server.stop()
    [got] = hook.received
    note = Notification.model_validate_json(got.body)
    assert note.id == "decision:e1-take_profit-s1-n1" and note.kind == "decision"
    expected = hmac.new(b"s3cret", got.body, hashlib.sha256).hexdigest()
    assert got.headers["X-Thalex-TP-Signature-256"] == f"sha256={expected}"
    [got] = telegram.received
    assert got.path == "/bot123:ABC/sendMessage"
    assert got.json["chat_id"] == "-1001" and got.json["text"].startswith("Take profit: closing everything")
    assert slack.received[0].path == "/services/T/B/X" and slack.received[0].json["text"].startswith(
        "*Take profit"
    )
    assert discord.received[0].json["content"].startswith("**Take profit")
    assert picky.received == []  # it asked for closure failures only
    [stored] = await read_stream(redis, names.notifications, Notification)
    assert stored == note


async def test_a_target_that_is_down_gets_it_once_when_it_comes_back(
    redis_url: str, names: Names, redis: Redis
) -> None:
    server = StandIn()  # its port is reserved, nothing listens yet
    settings = notify_settings(redis_url, names, [webhook("hook", server)])
    async with in_process(build, settings, "notify"):
        await xadd(redis, names.commands, command(1))
        outbox = Outbox(redis, names, "hook")

        async def retried() -> bool:
            entries = await outbox.entries()
            return bool(entries) and entries[0].attempts >= 3

        deadline = time.monotonic() + 10
        while not await retried():
            assert time.monotonic() < deadline, "no retries while the target was down"
            await asyncio.sleep(0.05)
        await server.start()
        try:
            await wait_until(lambda: server.received, what="delivery after the target came back")
            await asyncio.sleep(1.0)
        finally:
            await server.stop()
        assert await outbox.entries() == []
    assert server.ids() == ["decision:e1-take_profit-s1-n1"]


async def test_a_rejected_notification_is_not_retried(redis_url: str, names: Names, redis: Redis) -> None:
    server = await StandIn(answers=[400]).start()
    try:
        async with in_process(build, notify_settings(redis_url, names, [webhook("hook", server)]), "notify"):
            await xadd(redis, names.commands, command(1))
            await xadd(redis, names.commands, command(2))
            await wait_until(lambda: len(server.received) == 2, what="both sent")
            await asyncio.sleep(1.0)
    finally:
        await server.stop()
    assert server.ids() == ["decision:e1-take_profit-s1-n1", "decision:e1-take_profit-s2-n2"]


async def test_a_target_that_rejects_makes_notify_red_until_one_is_delivered_again(
        redis_url: str, names: Names, redis: Redis) -> None:
    """A revoked token (401): dropped at once, nothing waits — the health must say the trader is not
    being told, and clear once the target takes a notification again."""
    server = await StandIn(answers=[401]).start()
    try:
        async with in_process(build, notify_settings(redis_url, names, [webhook("hook", server)]), "notify") \
                as service:
            await xadd(redis, names.commands, command(1))
            await wait_until(lambda: len(server.received) == 1, what="the rejected one")
            await wait_until(lambda: "hook" in service.rejecting, what="the rejection noted")
            with pytest.raises(Unhealthy, match="target rejecting"):
                await service._delivering()
            await xadd(redis, names.commands, command(2))
            await wait_until(lambda: len(server.received) == 2, what="the next one, accepted")
            await wait_until(lambda: not service.rejecting, what="the rejection forgotten")
            assert await service._delivering()
    finally:
        await server.stop()


async def test_the_rate_limit_spaces_a_burst(redis_url: str, names: Names, redis: Redis) -> None:
    """60 a minute after a burst of 2: five notifications take about 3 s, the first two at once."""
    server = await StandIn().start()
    settings = notify_settings(redis_url, names, [webhook("hook", server)], rate_per_minute=60, rate_burst=2)
    try:
        async with in_process(build, settings, "notify"):
            for n in range(1, 6):
                await xadd(redis, names.commands, command(n))
            await wait_until(lambda: len(server.received) == 5, within=15, what="five deliveries")
    finally:
        await server.stop()
    at = [r.at for r in server.received]
    assert at[1] - at[0] < 0.5
    assert at[2] - at[0] >= 0.8 and at[4] - at[0] >= 2.7
    assert sorted(server.ids()) == sorted(f"decision:e1-take_profit-s{n}-n{n}" for n in range(1, 6))


async def test_a_send_interrupted_by_a_crash_is_not_sent_again(
    redis_url: str, names: Names, redis: Redis
) -> None:
    """At most once: an entry left `sending` by a dead process may have arrived; it is settled, not resent."""
    server = await StandIn().start()
    settings = notify_settings(redis_url, names, [webhook("hook", server)])
    outbox = Outbox(redis, names, "hook")
    note = Notification(
        id="decision:crashed", kind="decision", severity="info", title="t", text="", ts=time.time()
    )
    async with redis.pipeline(transaction=True) as pipe:
        outbox.queue(pipe, note, time.time())
        await pipe.execute()
    assert (await outbox.claim(time.time())) is not None  # what the dead process did just before its POST
    try:
        async with in_process(build, settings, "notify"):
            await xadd(redis, names.commands, command(1))
            await wait_until(lambda: server.received, what="the new notification")
            await asyncio.sleep(0.5)
    finally:
        await server.stop()
    assert server.ids() == ["decision:e1-take_profit-s1-n1"]
    assert await outbox.settled(["decision:crashed"]) == {"decision:crashed"}


async def test_a_first_start_does_not_replay_history(redis_url: str, names: Names, redis: Redis) -> None:
    server = await StandIn().start()
    await xadd(redis, names.commands, command(1))  # before notify ever ran
    try:
        async with in_process(build, notify_settings(redis_url, names, [webhook("hook", server)]), "notify"):
            await asyncio.sleep(0.3)
            await xadd(redis, names.commands, command(2))
            await wait_until(lambda: server.received, what="the new decision")
            await asyncio.sleep(0.5)
    finally:
        await server.stop()
    assert server.ids() == ["decision:e1-take_profit-s2-n2"]


async def test_a_service_unhealthy_too_long_is_told_and_its_recovery(
    redis_url: str, names: Names, redis: Redis
) -> None:
    executor = await StandIn(health={"healthy": False, "checks": {"redis": True, "consuming": False}}).start()
    server = await StandIn().start()
    settings = notify_settings(
        redis_url,
        names,
        [webhook("hook", server)],
        unhealthy_after_seconds=0.6,
        health_interval_seconds=0.2,
        health_urls={"executor": f"{executor.url}/health"},
    )
    try:
        async with in_process(build, settings, "notify"):
            await wait_until(lambda: server.received, what="the unhealthy notification")
            executor.health = {"healthy": True, "checks": {"redis": True, "consuming": True}}
            await wait_until(lambda: len(server.received) == 2, what="the recovery")
            await asyncio.sleep(0.6)
    finally:
        await executor.stop()
        await server.stop()
    down, up = (r.json for r in server.received)
    assert down["kind"] == "service_unhealthy" and "failing: consuming" in down["text"]
    assert up["kind"] == "service_recovered" and len(server.received) == 2


def _config(tmp_path: Path, settings: Settings, port: int) -> Path:
    path = tmp_path / "notify.toml"
    path.write_text(f"""[redis]
url = "{settings.redis.url}"
namespace = "{settings.names.namespace}"

[notify]
retry_max_seconds = 2
health_urls = {{}}

[[notify.targets]]
name = "hook"
type = "webhook"
url = "http://127.0.0.1:{port}/hook"
""")
    return path


async def test_killed_and_restarted_mid_way_no_notification_is_lost_or_sent_twice(
    redis_url: str, names: Names, redis: Redis, tmp_path: Path
) -> None:
    server = StandIn()
    config = _config(tmp_path, settings_for(redis_url, names), server.port)
    process = ServiceProcess("notify", config, tmp_path / "notify.log")
    process.start()
    outbox = Outbox(redis, names, "hook")
    try:
        await _wait(lambda: redis.exists(names.notify_key("state")), "notify's first start")
        for n in (1, 2, 3):
            await xadd(redis, names.commands, command(n))

        async def three_waiting() -> bool:
            """Each tried once and waiting for its retry (1 s away): no request is under way."""
            entries = await outbox.entries()
            return len(entries) == 3 and all(e.state == "waiting" and e.attempts >= 1 for e in entries)

        await _wait(three_waiting, "three notifications waiting for the target")
        process.kill()
        await server.start()
        await xadd(redis, names.commands, command(4))  # while notify is down
        process.start()
        await wait_until(lambda: len(server.received) == 4, within=20, what="all four delivered")
        await asyncio.sleep(1.5)
    finally:
        process.stop()
        await server.stop()
    assert sorted(server.ids()) == sorted(f"decision:e1-take_profit-s{n}-n{n}" for n in (1, 2, 3, 4)), (
        process.log()
    )


async def _wait(check: Any, what: str, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def test_an_unreadable_secret_file_stops_notify_with_exit_2_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "notify.toml"
    config.write_text(f"""[[notify.targets]]
name = "phone"
type = "telegram"
bot_token_file = "{tmp_path / "missing-token"}"
chat_id_file = "{tmp_path / "missing-chat"}"
""")
    done = subprocess.run(
        [sys.executable, "-m", "services.notify", "--config", str(config), "--metrics-port", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "notify.targets.0.bot_token_file" in done.stderr and "cannot read the file" in done.stderr


@pytest.mark.parametrize(("target", "content", "key", "rule"), [
    ("telegram", b"\xff\xfe\x00binary", "notify.targets.0.bot_token_file", "is not a text (UTF-8) file"),
    ("webhook", b"hooks.slack.com/services/T0/B0/XXXX\n", "notify.targets.0.url_file",
     "holds no http:// or https:// URL"),
])
def test_a_secret_file_notify_cannot_use_stops_it_with_exit_2_naming_the_key(
        tmp_path: Path, target: str, content: bytes, key: str, rule: str) -> None:
    """Before: a binary token file ended in a traceback (exit 1, a restart loop), and a URL without its
    scheme was accepted — every notification then dropped as "unconfirmed", health green."""
    secret = tmp_path / "secret"
    secret.write_bytes(content)
    secret.chmod(0o600)
    chat = tmp_path / "chat"
    chat.write_text("42\n")
    fields = (f'bot_token_file = "{secret}"\nchat_id_file = "{chat}"' if target == "telegram"
              else f'url_file = "{secret}"')
    config = tmp_path / "notify.toml"
    config.write_text(f'[[notify.targets]]\nname = "phone"\ntype = "{target}"\n{fields}\n')
    done = subprocess.run(
        [sys.executable, "-m", "services.notify", "--config", str(config), "--metrics-port", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert key in done.stderr and rule in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert "hooks.slack.com/services/T0/B0/XXXX" not in done.stderr
