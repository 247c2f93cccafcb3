"""The Thalex session layer ingest and the executor share.

* `connection.Connection` — one websocket over the official `thalex` client: open, log in,
  requests matched to answers (`requests.Requests`), a read loop that hands notifications and
  unusable frames to the service, close;
* `session.Session` — the supervisor: reconnects with jittered backoff, follows the exchange's
  reconnect notice, detects half-open connections, stops on a refused login, runs the service's
  set-up hook after every login;
* `key.ThalexKey` / `key.LoginRejected` — the API key and the refusals that stop a service
  (exit 2 naming the key);
* `models` — the exchange's objects, typed (pydantic);
* `pacing.OrderPacer` — order messages kept under Thalex's per-connection rate;
* `channels.subscribe` / `channels.left_out` — a subscribe answer lists what is held: every
  channel it leaves out is refused, though the answer is no error (api.yaml).
"""

from services.common.thalex.channels import ChannelsRefused, left_out, subscribe
from services.common.thalex.connection import Connection, Garbage, Notification
from services.common.thalex.key import FATAL_LOGIN_CODES, LoginRejected, ThalexKey
from services.common.thalex.pacing import OrderPacer
from services.common.thalex.requests import NO_CODE, ConnectionLost, Requests, ThalexError
from services.common.thalex.session import Session, backoff_delay

__all__ = [
    "FATAL_LOGIN_CODES",
    "NO_CODE",
    "ChannelsRefused",
    "Connection",
    "ConnectionLost",
    "Garbage",
    "LoginRejected",
    "Notification",
    "OrderPacer",
    "Requests",
    "Session",
    "ThalexError",
    "ThalexKey",
    "backoff_delay",
    "left_out",
    "subscribe",
]
