"""The notify service: tells the trader what the guardian did and what is wrong.

`core` is the pure part (which notifications, with which words and figures); `targets` the
places they go (webhook, Telegram, Slack, Discord) and what an HTTP answer means; `outbox` each
target's queue in Redis (at most once per target across restarts); `app` the shell.
"""
