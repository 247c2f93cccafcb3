"""The executor: the only process holding a key with trading permission.

It consumes `tp:commands`, closes the listed positions on Thalex with reduce-only orders
priced through the book, at most once per `command_id` (progress and a lease in Redis, orders
labelled so a restarted executor finds them), verifies flat against the exchange's portfolio
and reports every step on `tp:reports`. `plan` is the pure core, `session` the Thalex session,
`app` the wiring; docs/executor.md tells the whole story.
"""
