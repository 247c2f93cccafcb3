"""Take-profit's answer to each operator control: accepted or refused, and why (pure, no I/O).

Every `tp:control` entry take-profit handles gets one `ControlAnswer` on `tp:control:answers`,
written in the transaction that acks the control. `thalex-tp halt|resume|close-all` wait for it,
so a refused command (a `close_all` with nothing to close, one while a closure is in flight)
never looks like success.

A `close_all` or `resume` older than `CONTROL_MAX_AGE_SECONDS` when take-profit reads it is
refused as `expired`: the operator who sent it was told it went unanswered (take-profit down) and
must not have everything closed, or a halt lifted, minutes later by surprise. A late `halt` is
still applied: standing down late is safe, trading on is not.
"""

from __future__ import annotations

import time

from services.common.contracts import (
    CONTROL_MAX_AGE_SECONDS,
    Control,
    ControlAction,
    ControlAnswer,
    ControlOutcome,
    Halt,
)

EXPIRED = "expired"
NOT_CLOSABLE = "not_closable"

REFUSALS: dict[str, str] = {
    "no_snapshot": "take-profit has not received a snapshot yet: is portfolio running and ingest publishing?",
    "no_positions": "there is no open position to close",
    "only_dust": ("only dust is open: positions below the instrument's minimum order, which no order can "
                  "close (`thalex-tp status` lists them); trade them up or let them expire"),
    "epoch_closed": "the epoch has just been closed; its positions are gone",
    "closure_in_flight": "a closure is already in flight; follow it with `thalex-tp history`",
    NOT_CLOSABLE: "no closing command could be built from the last snapshot (see take-profit's log)",
}


def expired(control: Control, now: float) -> bool:
    """A `close_all` or `resume` too old to act on (see the module docstring)."""
    return control.action is not ControlAction.HALT and now - control.ts > CONTROL_MAX_AGE_SECONDS


def _halt_words(halt: Halt | None) -> str:
    if halt is None:
        return "quoters may trade"
    until = "" if halt.until is None else f" until {time.strftime('%H:%M:%S', time.localtime(halt.until))}"
    return f"quoters stay halted: {halt.reason} {halt.command_id or ''}".rstrip() + until


def answer_control(control: Control, control_id: str, now: float, *, refusal: str | None = None,
                   command_id: str | None = None, halt_after: Halt | None = None,
                   lifted_failure: str | None = None, closed_breaker: bool = False) -> ControlAnswer:
    """The answer to one control; `refusal` is the reason code when it was not acted on."""
    halt = None if halt_after is None else halt_after.reason
    if refusal == EXPIRED:
        detail = (f"sent {now - control.ts:.0f} s before take-profit read it (limit "
                  f"{CONTROL_MAX_AGE_SECONDS:.0f} s): not acted on; send it again if you still mean it")
    elif refusal is not None:
        detail = REFUSALS.get(refusal, f"refused: {refusal}")
    elif control.action is ControlAction.HALT:
        detail = ("operator halt set: quoters stand down and nothing is closed automatically until "
                  "`thalex-tp resume` (the emergency stop stays armed)")
    elif control.action is ControlAction.RESUME:
        lifted = "operator halt lifted" + (
            f", and the halt the failed closure {lifted_failure} left" if lifted_failure else "") + (
            ", and the circuit breaker closed (automatic closures resume)" if closed_breaker else "")
        detail = f"{lifted}; {_halt_words(halt_after)}"
    else:
        detail = f"closing every position: command {command_id}"
    outcome = ControlOutcome.ACCEPTED if refusal is None else ControlOutcome.REFUSED
    reason = refusal or {ControlAction.HALT: "halted", ControlAction.RESUME: "resumed",
                         ControlAction.CLOSE_ALL: "closing"}[control.action]
    return ControlAnswer(control_id=control_id, action=control.action, by=control.by, outcome=outcome,
                         reason=reason, detail=detail, command_id=command_id, halt=halt, ts=now)
