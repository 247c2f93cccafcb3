"""The executor's shell: consumes `tp:commands`, closes positions on Thalex, reports on `tp:reports`.

The decisions are pure functions: prices, amounts, hedge sizing and the command's state machine
in `plan.py`, planning a wave in `waves.py`, settling it, verifying flat and failing in
`settle.py`. Around them: the lease and progress in Redis (`store.py`), the Thalex session and
sending orders (`exchange.py`), market reads (`market.py`), metrics (`metrics.py`). This module
runs a command through them. See docs/executor.md.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass

from redis.asyncio.client import Pipeline

from services.common.bus import Bus, Delivery, raise_if_cancelled
from services.common.config import Settings
from services.common.contracts import (
    Command,
    ExchangeError,
    InstrumentInfo,
    Report,
    ReportStatus,
)
from services.common.reference import ReferenceReader
from services.common.service import Health, Runnable, service_main
from services.common.signing import ForgedCommand, require_command_key, verify_command
from services.common.thalex import NO_CODE, ConnectionLost, LoginRejected, ThalexError
from services.executor.clearing import Answer, kinds
from services.executor.exchange import TradingSession
from services.executor.market import Ask, Market, WaveReads, settle_quietly
from services.executor.metrics import (
    COMMANDS,
    DRY_RUN,
    ORDERS_FILLED,
    RETRIES,
    TIME_TO_FIRST_ORDER,
    TIME_TO_FLAT,
)
from services.executor.plan import TEMPORARY_FAILURE, CommandWave, Progress, Stage, too_late
from services.executor.rounds import ClearingRounds
from services.executor.settle import (
    RETRY_PAUSE,
    Outcome,
    Step,
    Verdict,
    count_trades,
    fail,
    next_step,
    settle_wave,
    verify_flat,
)
from services.executor.store import Store, Work
from services.executor.waves import (
    Buffers,
    DecisionWave,
    Quote,
    dry_run_orders,
    expand_claim,
    not_fresh_full,
    plan_wave,
    sort_legs,
    uncompact_claim,
    wave_from_command,
    wave_refusal,
    wave_sent,
)

log = logging.getLogger(__name__)

GROUP = "executor"
CLAIM_MARGIN_SECONDS = 30.0
DECISION_PRICE_MAX_AGE_SECONDS = 1.0
"""A command older than this is closed from fresh market reads only (`waves.wave_refusal`)."""
REMEMBERED_COMMANDS = 10_000


class Executor:
    """Closes the positions of each command at most once; see docs/executor.md."""

    def __init__(self, settings: Settings, bus: Bus, consumer_name: str) -> None:
        self.config = config = settings.executor
        self.bus = bus
        self.names = settings.names
        self.command_key = require_command_key(settings)
        """Take-profit's signing secret: only a command signed with it is acted on (exit 2 without it)."""
        self.buffers = Buffers(config.close_price_buffer, config.max_close_price_buffer)
        self.clearing = ClearingRounds(kinds(config.cancel_open_orders, config.cancel_mass_quotes,
                                             config.cancel_conditional_orders, config.cancel_bots))
        self.store = Store(bus.redis, self.names, bus.maxlen, consumer_name)
        self.session = TradingSession(settings, bus, on_trades=lambda trades: self.market.on_trades(trades))
        self.market = Market(bus.redis, self.names,
                             ReferenceReader(bus, self.names.instruments, InstrumentInfo))
        self.seen: dict[str, None] = {}
        """Command ids this process has claimed, oldest first (no early `cancel_all` for a replay)."""
        self.consumer = bus.consumer(self.names.commands, GROUP, consumer_name, Command, self.handle,
                                     batch_size=1,
                                     claim_idle_seconds=config.deadline_seconds + CLAIM_MARGIN_SECONDS)
        bus.before_start.append(self.session.started)  # up before pending commands are resumed

    async def run(self) -> None:
        """Keep the session up; a refused login ends the command in hand (`failed`), then the service."""
        try:
            await self.session.start()
        except LoginRejected:
            async with self.consumer.lock:
                pass
            raise

    # Commands

    async def handle(self, batch: list[Delivery[Command]], pipe: Pipeline) -> None:
        """Execute each command; raising leaves it pending, to be resumed on redelivery — except on
        its last delivery: a command that cannot be executed ends `failed`, never only as a dead letter.
        A command that is not take-profit's (`verify_command`) is refused before anything else."""
        for delivery in batch:
            try:
                verify_command(delivery.doc, self.command_key, delivery.text)
            except ForgedCommand as exc:
                await self._refuse(delivery, exc.reason, pipe)
                continue
            try:
                await self.execute(delivery.doc.upgraded())  # a v1 command's legs as columns, once
            except Exception as exc:
                raise_if_cancelled()
                if delivery.deliveries < self.consumer.max_deliveries:
                    raise
                log.exception("%s: delivery %d failed too; reporting it failed", delivery.doc.command_id,
                              delivery.deliveries)
                await self._give_up(delivery.doc, f"{type(exc).__name__}: {exc}", pipe)

    async def _refuse(self, delivery: Delivery[Command], why: str, pipe: Pipeline) -> None:
        """Refuse a command the executor cannot tie to take-profit, acked with the entry.

        Nothing else happens: no lease, no progress (a forgery cannot make the real command with
        the same id a `duplicate`), no request to the exchange. It is reported `failed` — unless its
        id is one the executor already works or worked on: then the forgery copied a real
        command's id, and a `failed` under it would tell take-profit its real closure failed; it is
        dead-lettered with the reason instead.
        """
        command = delivery.doc
        log.error("REFUSED %s: %s", command.command_id, why)
        COMMANDS.labels("refused").inc()
        if await self.store.known(command.command_id):
            self.bus.queue_deadletter(pipe, self.names.commands, delivery.entry_id,
                                      command.model_dump_json(), f"{why} (its id is a real command's: "
                                      "no report, which take-profit would take for that command's)")
            return
        self._queue_failed(command, why, pipe)

    def _queue_failed(self, command: Command, why: str, pipe: Pipeline) -> None:
        """A `failed` report of a command that has no progress to carry it, in the handler's transaction."""
        self.bus.queue_publish(pipe, self.names.reports, Report(
            command_id=command.command_id, status=ReportStatus.FAILED, epoch=command.epoch,
            fraction=command.fraction, ts=time.time(), error=ExchangeError(code=NO_CODE, message=why)))

    async def execute(self, command: Command) -> None:
        priced_ts = time.time()
        compact = self._may_price_from_command(command, priced_ts)

        def fresh() -> tuple[Progress, list[Report]]:
            now = time.time()
            if compact:  # the compact claim: the rest of the progress follows the first order
                return Progress.claimed(command, now, self.config.deadline_seconds, CommandWave(
                    priced_ts=priced_ts, buffer=self.buffers.base, ceiling=self.buffers.ceiling)), []
            progress = Progress.start(command, now, self.buffers.base, self.config.deadline_seconds)
            return progress, [progress.report(ReportStatus.RECEIVED, now)]

        # lease + progress + `received`; its request is written first, when the loop next runs
        claiming = asyncio.ensure_future(self.store.claim(command.command_id, fresh))
        early_cancel = None
        first = None
        try:
            if compact:
                # the round is sent with the claim, not after it: written right behind the claim's
                # request, while its answer is on the way (the first order waits for that answer, not
                # for this round's). Only for a fresh command not seen before, so a replay (which the
                # claim turns into a `duplicate`) cancels nothing
                early_cancel = self.clearing.start(self.session.request) if self.clearing else None
                await asyncio.sleep(0)  # the claim and the round leave; the wave is checked meanwhile
                first = await self._decision_wave(command, priced_ts)
            claim = await claiming
        except BaseException:
            settle_quietly(claiming, cancel=True)
            settle_quietly(early_cancel)
            raise
        self._remember(command.command_id)
        if claim is None:
            settle_quietly(early_cancel)
            await self._publish_duplicate(command)
            return
        try:
            assert claim.progress is not None
            work = Work(claim.progress, claim.token, command.created_ts)
            if not claim.created:
                log.info("resuming %s at stage %s", command.command_id, claim.progress.stage)
                await self._expand(work.progress, command, self._ask(work))
            elif compact and first is None:
                uncompact_claim(work.progress, command)  # the usual path: saved before its first order
            heartbeat = asyncio.create_task(self.store.keep_lease(work))
            try:
                await self._work(work, resumed=not claim.created, early_cancel=early_cancel,
                                 first=first if claim.created else None)
            finally:
                heartbeat.cancel()
            COMMANDS.labels(work.progress.stage.value).inc()
        finally:
            settle_quietly(early_cancel)
            await self.store.release(command.command_id, claim.token)

    def _may_price_from_command(self, command: Command, now: float) -> bool:
        """A fresh full closure this process has not seen, its deadline ahead: its claim is the compact
        one, its clearing round goes out with the claim, and its first wave is checked while both are on
        the way. (The deadline is checked here, once, for the round and that first wave: they are one
        step, sent together.)"""
        return not self.config.dry_run and command.command_id not in self.seen \
            and not_fresh_full(command, now, DECISION_PRICE_MAX_AGE_SECONDS) is None

    async def _decision_wave(self, command: Command, now: float) -> DecisionWave | None:
        """The first wave, to be priced from the command (docs/executor.md), or None for the usual path
        (why is logged: a book that keeps taking the usual path, slower to its first order, says why).
        Checked whole here, at the claim's `priced_ts`; its orders are priced as they leave
        (`_send_decision_wave`)."""
        try:  # asked once: this path must not wait on a busy exchange
            infos = await self.market.infos(self.session.request, command.closing().instrument)
        except (ThalexError, ConnectionLost):
            return None  # the usual path asks again, through the command's `ask`: retried until the deadline
        refusal = wave_refusal(command, infos, self.buffers, now, DECISION_PRICE_MAX_AGE_SECONDS)
        if refusal is not None:
            log.info("%s: first wave from fresh market reads, not from the command: %s", command.command_id,
                     refusal)
            return None
        return DecisionWave(command, infos, self.buffers, now)

    async def _expand(self, progress: Progress, command: Command, ask: Ask) -> None:
        """A compact claim found on resuming (a crash before the first save): its legs and first wave,
        priced again from the command as they were (`waves.expand_claim`). `ask` reads instrument data."""
        claim = progress.command_wave
        if claim is None:
            return
        infos = await self.market.infos(ask, command.closing().instrument)
        wave = wave_from_command(command, infos, Buffers(claim.buffer, claim.ceiling), claim.priced_ts,
                                 DECISION_PRICE_MAX_AGE_SECONDS)
        if isinstance(wave, str):
            log.warning("%s: its first wave cannot be priced again (%s); counting every leg as sent",
                        command.command_id, wave)
        expand_claim(progress, command, wave)

    def _remember(self, command_id: str) -> None:
        self.seen[command_id] = None
        while len(self.seen) > REMEMBERED_COMMANDS:
            del self.seen[next(iter(self.seen))]

    async def _publish_duplicate(self, command: Command) -> None:
        log.info("command %s already handled: duplicate", command.command_id)
        COMMANDS.labels("duplicate").inc()
        await self.bus.publish(self.names.reports, Report(
            command_id=command.command_id, status=ReportStatus.DUPLICATE, epoch=command.epoch,
            fraction=command.fraction, ts=time.time()))

    async def _give_up(self, command: Command, why: str, pipe: Pipeline) -> None:
        """Report `failed` for a command whose handling keeps failing (the bus would dead-letter it next).

        Through its progress when it can be claimed; when even that fails (its progress in Redis
        unreadable), the report goes out with the entry's ack, without one.
        """
        def fresh() -> tuple[Progress, list[Report]]:
            progress = Progress.start(command, time.time(), self.buffers.base, self.config.deadline_seconds)
            return progress, [progress.report(ReportStatus.RECEIVED, time.time())]

        try:
            claim = await self.store.claim(command.command_id, fresh)
        except ValueError as exc:  # an unreadable progress (a ValidationError is a ValueError)
            log.error("%s: cannot claim it either (%s); reporting it failed without its progress",
                      command.command_id, exc)
            self._queue_failed(command, f"the executor cannot handle it: {why}", pipe)
            return
        if claim is None:
            return  # finished meanwhile: its outcome is out
        try:
            assert claim.progress is not None
            try:
                await self._expand(claim.progress, command, self.session.request)  # giving up: once
            except Exception as exc:  # the failure may be the instrument data
                raise_if_cancelled()
                expand_claim(claim.progress, command, f"instrument data unavailable: {exc}")
            work = Work(claim.progress, claim.token, command.created_ts)
            work.progress.error = ExchangeError(code=NO_CODE, message=f"the executor cannot handle it: {why}")
            await self._fail(work, {})
            COMMANDS.labels(Stage.FAILED.value).inc()
        finally:
            await self.store.release(command.command_id, claim.token)

    async def _work(self, work: Work, resumed: bool, early_cancel: asyncio.Future[list[Answer]] | None = None,
                    first: DecisionWave | None = None) -> None:
        if early_cancel is None:  # a round sent with the claim had its deadline checked as it left
            late = too_late(work.progress, time.time(), resumed=resumed)
            if late is not None:
                await self._finish_late(work, late)
                return
        if self.config.dry_run:
            await self._dry_run(work)
            return
        reads: WaveReads | None = None
        try:
            if first is not None:
                await self._send_decision_wave(work, first, early_cancel)
            else:
                if work.progress.stage is Stage.RECEIVED:
                    reads = await self._cancel_orders(work, resumed, early_cancel)
                if resumed:
                    await self._resync(work)
            await self._close(work, reads)
        except ThalexError as exc:  # a request the executor cannot do without (e.g. the login refused)
            work.progress.error = ExchangeError(code=exc.code, message=exc.message)
            await self._fail(work, {})
        except ConnectionLost as exc:  # still unreachable at the deadline
            work.progress.error = ExchangeError(code=TEMPORARY_FAILURE,
                                                message=f"exchange unreachable: {exc}")
            await self._fail(work, {})
        finally:
            if reads is not None:
                reads.cancel()

    async def _finish_late(self, work: Work, why: str) -> None:
        """End a command whose deadline passed before this executor got to it, sending nothing: no
        clearing round, no order (`plan.too_late` says why) — `failed`, with that reason.

        One resumed after orders of its own had left first finds out what they did, as any resumed
        command does (`_resync`: its trades by label; an order of its own still open is cancelled), and
        reads the portfolio. If they had closed every leg, it is verified as usual (`completed` if
        flat: take-profit lifts its failure halt on a late `completed`); otherwise the reason is given
        for each leg left. Should the exchange not answer, it ends `failed` without knowing.
        """
        progress = work.progress
        log.warning("%s: %s", progress.command_id, why)
        progress.error = ExchangeError(code=NO_CODE, message=why)
        positions: dict[str, float] = {}
        if progress.first_order_ts is not None and not self.config.dry_run:
            try:
                await self._resync(work)
                positions = await self.market.positions(self._ask(work))
                infos = await self.market.infos(self._ask(work), list(progress.legs))
            except (ThalexError, ConnectionLost) as exc:
                log.warning("%s: what its earlier orders did is not known: %s", progress.command_id, exc)
            else:
                remaining, dust = sort_legs(progress, positions, infos, time.time())
                work.reports.extend(dust)
                if not remaining:
                    if progress.stage is Stage.RECEIVED:  # a compact claim's first wave had left
                        progress.to(Stage.CLOSING)
                    progress.to(Stage.VERIFYING)
                    await self._verify(work, positions)
                    return
        await self._fail(work, positions)

    async def _cancel_orders(self, work: Work, resumed: bool,
                             early: asyncio.Future[list[Answer]] | None = None) -> WaveReads | None:
        """Clear the account first (`clearing.py`: orders, mass quotes, conditional orders, bots), so
        nothing can rebuild the position; the first wave's reads go out with it (a partial closure's
        portfolio only after it, so `position_before` cannot move under it). No order of the usual
        path leaves before the round is answered. `early`: the round this process sent with the claim
        (a fresh command whose first wave is not priced from it after all, or one another executor
        had claimed and this one resumes), used instead of sending another."""
        progress = work.progress
        clear = asyncio.create_task(self.clearing.first(work, self._ask(work), early)) \
            if self.clearing else None  # created first: sent first
        reads = None
        if not resumed:
            reads = WaveReads.start(self.market, self._ask(work), progress.open_legs(), progress.groups,
                                    positions=clear is None or progress.full)
        if clear is not None:
            try:
                await clear
            except BaseException:
                if reads is not None:
                    reads.cancel()
                raise
            progress.to(Stage.ORDERS_CANCELLED)
        progress.to(Stage.CLOSING)  # saved with the first `order_sent`; a crash before it repeats the round
        return reads

    async def _send_decision_wave(self, work: Work, wave: DecisionWave,
                                  early_cancel: asyncio.Future[list[Answer]] | None) -> None:
        """Send the first wave promised by the compact claim, right behind the clearing round that went
        out with the claim; its other orders are priced, and the full progress (legs, the wave's
        `order_sent`) built, once the first order is written, and saved as the orders leave.

        The round's requests were written to the session before the claim's answer came back, and
        the exchange handles one connection's requests in order: every cancel acts before the first
        order, so the orders need not wait for the answers (docs/executor.md). A refused or
        unanswered `cancel_all` still fails the command, once the wave that went out with it is
        settled (its fills counted).
        """
        progress = work.progress
        clear = asyncio.create_task(self.clearing.first(work, self._ask(work), early_cancel)) \
            if self.clearing else None
        TIME_TO_FIRST_ORDER.observe(max(0.0, time.time() - work.created_ts))
        # the first order is written before the other sends are set up (1,000 of them: milliseconds of
        # tasks before any runs); the outbox (`received`, `order_sent`) is published as the orders
        # leave, the round's reports after
        first = wave.head()
        head = asyncio.ensure_future(self.session.send(first, progress.label, work.check)) if first else None
        try:
            await asyncio.sleep(0)
        except BaseException:  # cancelled before the rest was set up: as the gather below would be
            settle_quietly(head, cancel=True)
            settle_quietly(clear, cancel=True)
            raise
        orders = wave.orders()
        expand_claim(progress, wave.command, orders)
        rest = (self.session.send(order, progress.label, work.check) for order in orders[1:])
        sends = asyncio.gather(*([head] if head is not None else []), *rest)
        try:
            outcomes, _ = await asyncio.gather(sends, self.store.commit(work))
        except BaseException:
            settle_quietly(clear, cancel=True)
            raise
        refused: ThalexError | ConnectionLost | None = None
        if clear is not None:
            try:
                await clear
                progress.to(Stage.ORDERS_CANCELLED)
            except (ThalexError, ConnectionLost) as exc:
                refused = exc
        progress.to(Stage.CLOSING)
        pause = await self._settle(work, outcomes, from_decision=True)
        if refused is not None:
            raise refused
        if pause:
            await asyncio.sleep(min(pause, max(0.0, progress.deadline_ts - time.time())))

    def _ask(self, work: Work) -> Ask:
        """The requests of a command: retried until its deadline, while it holds its lease."""
        return functools.partial(self.session.retrying, work.progress.deadline_ts, work.check)

    async def _dry_run(self, work: Work) -> None:
        """Price every listed position as the first wave would, send nothing, report the orders."""
        names = list(work.progress.legs)
        infos = await self.market.infos(self._ask(work), names)
        quotes = {n: await self.market.quote(self._ask(work), n, with_book=False) for n in names}
        reports = dry_run_orders(work.progress, quotes, infos, time.time(), self.config.max_index_deviation)
        work.reports.extend(reports)
        await self.store.commit(work)
        log.info("dry run of %s: would send %s", work.progress.command_id, reports[0].orders)

    # Closing

    async def _close(self, work: Work, reads: WaveReads | None = None) -> None:
        """Waves of closing orders until every leg is closed, dust or stopped, then verify flat.

        A closing wave's portfolio and quotes are read concurrently (`reads`, already in flight
        for the first wave); verifying reads only the portfolio.
        """
        progress = work.progress
        while True:
            work.check()
            if reads is None:  # verifying reads the portfolio only (when asked for the result)
                reads = WaveReads() if progress.stage is Stage.VERIFYING else WaveReads.start(
                    self.market, self._ask(work), progress.open_legs(), progress.groups)
            positions, quotes = await reads.result(self.market, self._ask(work))
            reads = None
            if progress.stage is Stage.VERIFYING:
                if await self._verify(work, positions):
                    return
                continue
            pause = await self._wave(work, positions, quotes)
            step = next_step(progress, time.time())
            if step is Step.VERIFY:
                await self.store.commit(work)
            elif step is Step.FAIL:
                await self._fail(work, positions)
                return
            elif pause:
                await asyncio.sleep(min(pause, max(0.0, progress.deadline_ts - time.time())))

    async def _wave(self, work: Work, positions: dict[str, float], read: dict[str, Quote] | None) -> float:
        """Send one round of closing orders; returns how long to pause before the next.

        Nothing is sent once the deadline has come, checked before the clearing round and again right
        before the orders: the legs are still sorted (`next_step` then verifies a closure whose legs are
        all closed, and fails one with legs open)."""
        progress = work.progress
        if self.clearing and progress.first_order_ts is not None and not progress.past_deadline(time.time()):
            await self.clearing.again(work, self._ask(work))
        infos = await self.market.infos(self._ask(work), [leg.instrument for leg in progress.open_legs()])
        remaining, dust = sort_legs(progress, positions, infos, time.time())
        work.reports.extend(dust)
        if not remaining or progress.past_deadline(time.time()):
            return 0.0
        quotes = await self.market.quotes(self._ask(work), list(remaining), progress.groups, read)
        orders = plan_wave(progress, remaining, positions, quotes, infos, self.config.max_index_deviation)
        if not orders:
            return RETRY_PAUSE
        now = time.time()
        if progress.past_deadline(now):
            return 0.0
        first = progress.first_order_ts is None
        work.reports.extend(wave_sent(progress, orders, now))  # `order_sent` dated before the deadline
        RETRIES.labels("remainder").inc(sum(progress.legs[o.instrument].orders_sent > 1 for o in orders))
        if first:
            TIME_TO_FIRST_ORDER.observe(max(0.0, time.time() - work.created_ts))
        await self.store.commit(work)  # order_sent and position_before in Redis before any order leaves
        outcomes = await asyncio.gather(*(self.session.send(o, progress.label, work.check) for o in orders))
        return await self._settle(work, outcomes)

    async def _settle(self, work: Work, outcomes: list[Outcome], from_decision: bool = False) -> float:
        """Count fills (with their fees), apply the error rules; returns the pause before the next wave."""
        pause = 0.0
        if any(o.lost for o in outcomes):
            await self._resync(work)
            pause = RETRY_PAUSE
        await self.market.await_fees([f.trade_id for o in outcomes if o.result for f in o.result.fills])
        for o in outcomes:
            if o.error is not None:
                log.warning("%s order rejected %s: %s", o.order.instrument, o.error.code, o.error.message)
        settled = settle_wave(work.progress, outcomes, self.market.fees, self.buffers, time.time(),
                              from_decision)
        for reason in settled.retries:
            RETRIES.labels(reason).inc()
        ORDERS_FILLED.inc(settled.filled_orders)
        work.reports.extend(settled.reports)
        await self.store.commit(work)
        return max(pause, settled.pause)

    async def _verify(self, work: Work, positions: dict[str, float]) -> bool:
        """Verify flat against the exchange's portfolio; False when a leg must be closed again."""
        progress = work.progress
        infos = await self.market.infos(self._ask(work), list(progress.legs))
        verdict, reopened, reports = verify_flat(progress, positions, infos, time.time())
        for name in reopened:
            log.warning("%s: %s not closed after all (position %s)", progress.command_id, name,
                        positions.get(name))
        work.reports.extend(reports)
        await self.store.commit(work)
        if verdict is Verdict.COMPLETED:
            TIME_TO_FLAT.observe(max(0.0, time.time() - work.created_ts))
            dust = reports[-1].error if reports else None
            fee = progress.total_fee()
            log.info("%s completed: %d legs, fees %s%s", progress.command_id, len(progress.legs),
                     "unknown" if fee is None else f"{fee:.6f}", f"; {dust.message}" if dust else "")
        elif verdict is Verdict.FAILED:
            log.error("%s failed: %s", progress.command_id, progress.error.message if progress.error else "")
        return verdict is not Verdict.CLOSE_AGAIN

    async def _fail(self, work: Work, positions: dict[str, float]) -> None:
        """Report `failed` naming every leg left open; needs nothing from the exchange."""
        work.reports.extend(fail(work.progress, positions, self.market.instruments, time.time()))
        await self.store.commit(work)
        log.error("%s failed: %s", work.progress.command_id,
                  work.progress.error.message if work.progress.error else "")

    async def _resync(self, work: Work) -> None:
        """After a restart or a lost answer: count this command's trades found by label and cancel any
        open order of its own, so a resumed command starts from what really happened."""
        ask = self._ask(work)
        reports = count_trades(work.progress, await self.market.trades_of(ask, work.progress), time.time())
        work.reports.extend(reports)
        for order_id in await self.market.open_orders_of(ask, work.progress.label):
            await ask("cancel", order_id=order_id, order=True)
        if reports:
            log.info("%s: found %d earlier orders by label", work.progress.command_id, len(reports))
        await self.store.commit(work)


@dataclass
class ExecutorService:
    """What `service_main` runs: the executor's session, closed cleanly on stop."""

    executor: Executor

    async def run(self) -> None:
        try:
            await self.executor.run()
        finally:
            await self.executor.session.close()


def build(settings: Settings, bus: Bus, health: Health, consumer_name: str) -> Runnable:
    executor = Executor(settings, bus, consumer_name)
    health.add("exchange", executor.session.health)
    DRY_RUN.set(1 if settings.executor.dry_run else 0)
    if settings.executor.dry_run:
        health.not_guarding["dry_run"] = ("the executor is in dry run ([executor] dry_run = true): it sends "
                                          "no order, so nothing will be closed")
    return ExecutorService(executor)


def main(argv: list[str]) -> int:
    return service_main("executor", argv, build, lambda s: s.metrics.executor_port)
