"""The portfolio service: folds fills, ticks and the exchange's positions into
fee-aware P&L snapshots, one epoch at a time.

`ledger` is the pure core (no I/O, no clock: time is passed in); `book` walks
book levels to price a close; `fees` estimates the cost of closing. The wiring
to Redis lives in `app`.
"""
