"""The clearing round on the exchange: what `clearing.py` decides, sent, checked and reported.

A round's requests go out back to back (one connection's requests are handled in order, so each
listing says what the cancel before it removed); a request refused or unanswered becomes an
`Answer` with its error, never an exception, so one kind failing never hides what the others did.
"""

from __future__ import annotations

import asyncio
import logging
import time

from services.common.contracts import ExchangeError, RemovalKind
from services.common.thalex import ConnectionLost, ThalexError
from services.executor.clearing import Answer, cancel_refused, clearing_reports, round_requests
from services.executor.market import Ask
from services.executor.metrics import REMOVED
from services.executor.store import Work

log = logging.getLogger(__name__)


class ClearingRounds:
    """The rounds of the kinds `[executor]` enables (none: no round at all)."""

    def __init__(self, kinds: tuple[RemovalKind, ...]) -> None:
        self.kinds = kinds

    def __bool__(self) -> bool:
        return bool(self.kinds)

    def start(self, ask: Ask) -> asyncio.Future[list[Answer]]:
        """Every request of one round, each in a task created now, in order: they reach the socket,
        in that order, the next time the caller yields. Resolves to each one's answer."""
        async def one(method: str) -> Answer:
            try:
                return Answer(await ask(method))
            except ThalexError as exc:
                return Answer(error=ExchangeError(code=exc.code, message=exc.message))
            except ConnectionLost:
                return Answer(answered=False)

        return asyncio.gather(*(asyncio.create_task(one(method)) for _, method in round_requests(self.kinds)))

    async def send(self, ask: Ask) -> list[Answer]:
        """Every request of one round, sent back to back in order; each one's answer."""
        return list(await self.start(ask))

    async def first(self, work: Work, ask: Ask, early: asyncio.Future[list[Answer]] | None) -> None:
        """The round sent with the claim, else (or for what of it failed) a retried one; its reports.

        A refused `cancel_all` still fails the command (as it always did); a refused removal of
        another kind is reported with its error and the closure goes on.
        """
        answers = list(await early) if early is not None else None
        if answers is None or cancel_refused(self.kinds, answers):
            if answers is not None:
                log.warning("the clearing round sent with the claim failed in part (%s); retrying",
                            ", ".join(cancel_refused(self.kinds, answers)))
            answers = await self.send(ask)
        orders = cancel_refused(self.kinds, answers).get(RemovalKind.ORDERS)
        if orders is not None and orders.error is not None:
            raise ThalexError("cancel_all", orders.error.code, orders.error.message)
        if orders is not None:
            raise ConnectionLost("cancel_all: no answer before the deadline")
        self.report(work, answers)

    async def again(self, work: Work, ask: Ask) -> None:
        """Before a later wave: what came back since the last round (a quoter, a bot) is removed again."""
        self.report(work, await self.send(ask))

    def report(self, work: Work, answers: list[Answer]) -> None:
        """The round's reports into the command's outbox; what each kind removed in the log and metric."""
        work.clearing_rounds += 1
        reports = clearing_reports(work.progress, self.kinds, answers, work.clearing_rounds, time.time())
        for report in reports:
            if report.removed is not None and (report.removed.count or report.error is not None):
                log.info("%s: %s removed %s (%s)%s", work.progress.command_id, report.removed.kind,
                         report.removed.count, ", ".join(report.removed.labels or []) or "no labels",
                         f"; refused: {report.error.message}" if report.error else "")
            if report.removed is not None:
                REMOVED.labels(report.removed.kind.value).inc(report.removed.count or 0)
        work.reports.extend(reports)
