"""Paging of the history methods as api.yaml documents it: ``time_low``, ``time_high``, ``sort``,
``limit`` (1..1000, default 1000) and ``bookmark`` (pass it back, with the same filters, for the
next page; absent when there are no more results)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from services.paper.errors import INVALID_REQUEST, RpcError
from services.paper.params import choice, limit, number


def page(
    rows: list[tuple[int, dict[str, Any]]],
    params: dict[str, Any],
    *,
    time_key: str,
    result_key: str,
    sortable: bool = True,
    keep: Callable[[dict[str, Any]], bool] | None = None,
    visible_until: float | None = None,
) -> dict[str, Any]:
    """One page of ``rows`` (``(sequence number, item)``, oldest first).

    ``keep`` filters items (instrument names, bot ids); ``visible_until`` hides items newer than
    it (a history that is not real-time).
    """
    size = limit(params)
    time_low = number(params, "time_low")
    time_high = number(params, "time_high")
    sort = choice(params, "sort", ("ascending", "descending"), "descending") if sortable else "descending"
    bookmark = params.get("bookmark")
    after: int | None = None
    if bookmark is not None:
        if not isinstance(bookmark, str) or not bookmark.isdigit():
            raise RpcError(INVALID_REQUEST, "invalid bookmark")
        after = int(bookmark)
    ascending = sort == "ascending"
    ordered = sorted(rows, key=lambda row: (row[1][time_key], row[0]), reverse=not ascending)
    selected: list[tuple[int, dict[str, Any]]] = []
    passed = after is None
    for seq, item in ordered:
        if not passed:
            passed = seq == after
            continue
        stamp = item[time_key]
        if (time_low is not None and stamp < time_low) or (time_high is not None and stamp > time_high):
            continue
        if visible_until is not None and stamp > visible_until:
            continue
        if keep is not None and not keep(item):
            continue
        selected.append((seq, item))
        if len(selected) > size:
            break
    result: dict[str, Any] = {result_key: [item for _, item in selected[:size]]}
    if len(selected) > size:
        result["bookmark"] = str(selected[size - 1][0])
    return result


def names_filter(params: dict[str, Any], param: str, field: str) -> Callable[[dict[str, Any]], bool] | None:
    """``instrument_names`` / ``bot_ids``: a comma-separated list matched against ``field``."""
    value = params.get(param)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RpcError(INVALID_REQUEST, f"{param} must be a comma-separated string")
    wanted = {part for part in value.split(",") if part}
    return lambda item: item.get(field) in wanted


def history_filter(params: dict[str, Any]) -> Callable[[dict[str, Any]], bool] | None:
    """Order and trade history: ``instrument_names`` and ``bot_ids`` together (None: keep everything)."""
    keeps = [f for f in (names_filter(params, "instrument_names", "instrument_name"),
                         names_filter(params, "bot_ids", "bot_id")) if f is not None]
    return (lambda item: all(f(item) for f in keeps)) if keeps else None
