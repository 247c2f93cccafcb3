"""The JSON-RPC method registry: one handler per Thalex method.

Each family of methods lives in its own module of :mod:`services.paper.methods` and registers its
handlers with ``@METHODS.method("private/...")``; importing the module (one line in
``methods/__init__.py``) is all the wiring a new family needs. A handler gets a :class:`Call`
and returns the ``result`` (or raises :class:`~services.paper.errors.RpcError`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from services.paper.errors import NOT_LOGGED_IN, UNAUTHORIZED, RpcError

if TYPE_CHECKING:
    from services.paper.connection import Connection
    from services.paper.engine import Event, Session
    from services.paper.market import Instrument
    from services.paper.server import PaperExchange


@dataclass
class Call:
    """One request being handled: the exchange, the asking connection, its params and the paper time."""

    exchange: PaperExchange
    conn: Connection
    method: str
    params: dict[str, Any]
    now: float

    @property
    def session(self) -> Session:
        """The logged-in session (``private/*`` methods only run logged in; error 7 otherwise)."""
        if self.conn.session is None:
            raise RpcError(NOT_LOGGED_IN, "not logged in")
        return self.conn.session

    @property
    def trading_session(self) -> Session:
        """The session of a key that may trade (28 for a read-only key)."""
        session = self.session
        if session.read_only:
            raise RpcError(UNAUTHORIZED, "unauthorized: read-only API key cannot trade")
        return session

    def after_reply(self, action: Callable[[], None]) -> None:
        """Run ``action`` right after the answer is queued (notifications follow the answer, as on Thalex)."""
        self.conn.after.append(action)

    def publish(self, events: list[Event]) -> None:
        """Send the events' notifications after the answer."""
        self.after_reply(lambda: self.exchange.fanout.publish(events))

    def instrument(self, name_param: str = "instrument_name") -> Instrument:
        """The active instrument named by a parameter (6 when not a string, 5 when unknown)."""
        return self.exchange.instrument_named(self.params.get(name_param))


Handler = Callable[[Call], Awaitable[Any]]


@dataclass(frozen=True)
class Method:
    name: str
    handler: Handler
    order_message: bool
    """An order message (insert/amend/cancel...): recorded in ``paper/order_log``."""


class MethodRegistry:
    """Method name -> handler; registering a name twice is a programming error."""

    def __init__(self) -> None:
        self._methods: dict[str, Method] = {}

    def method(self, name: str, *, order_message: bool = False) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            if name in self._methods:
                raise ValueError(f"method {name} registered twice")
            self._methods[name] = Method(name, handler, order_message)
            return handler

        return register

    def get(self, name: str) -> Method | None:
        return self._methods.get(name)

    def names(self) -> list[str]:
        return sorted(self._methods)


METHODS = MethodRegistry()
