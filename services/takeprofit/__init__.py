"""The take-profit service: decides when to close the account's positions; never trades.

`rules` is the pure core (no Redis, no asyncio, no clock: every time is passed
in) — the barriers, their priority and the guards, as a small state machine
whose state serialises to a JSON-able dict. The service shell (`app`) feeds it
snapshots, timer ticks, operator controls and the executor's outcome reports,
publishes the `Command` built from each `Decision`, holds the closure lease and
checkpoints the engine's state in Redis.
"""
