"""Ingest: the guardian's only eye on the exchange.

Logs in to Thalex (or the paper exchange) with a read-only key and publishes
the account's truth onto the wire contract: `tp:fills` (exactly once per
trade), `tp:ticks` (prices and, for positions, the book a close would hit),
`tp:positions` (the exchange's own portfolio view) and `tp:instruments`.

`translate` and `follow` are the pure core; `exchange` is the websocket
session; `app` wires them to Redis. See docs/ingest.md.
"""
