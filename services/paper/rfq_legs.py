"""The arithmetic of an RFQ's legs: integer quantities, fee quantities and leg prices (pure).

* :func:`minimise` is Thalex's conversion of requested leg amounts into integer leg quantities, an
  amount and a volume tick size (thalex.com, "Request-for-Quote": ``10, -10, -3.6`` becomes
  ``25, -25, -9`` times ``0.4``, quotable in steps of ``0.004`` when the option legs' volume tick is
  0.1).
* :func:`fee_quantities` is the share of each leg that pays trading fees (api.yaml ``fee_quantity``:
  "anywhere between 0 and abs(quantity)"). Thalex publishes the rule only in words (support article
  "When do I get a 50% fee discount on my RFQ trade": spreads in one underlying pay for one leg,
  delta-hedge legs are generally free, not two long or two short options, the pair's delta between
  -1 and 1); the exact computation here is the paper's reading of it, see docs/paper.md.
* :func:`leg_prices` splits one combination price over the legs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

MAX_DECIMALS = 6
"""Thalex: leg quantities "must have a precision under 6 decimals"."""


class LegError(ValueError):
    """Requested legs that cannot form an RFQ."""


def exact(value: float) -> Fraction:
    """The decimal a float was written as (at most ``MAX_DECIMALS`` decimals)."""
    fraction = Fraction(repr(value))
    if (fraction * 10**MAX_DECIMALS).denominator != 1:
        raise LegError(f"{value} has more than {MAX_DECIMALS} decimals")
    return fraction


def _gcd(a: Fraction, b: Fraction) -> Fraction:
    return Fraction(
        math.gcd(a.numerator * b.denominator, b.numerator * a.denominator), a.denominator * b.denominator
    )


def _lcm(a: Fraction, b: Fraction) -> Fraction:
    return Fraction(math.lcm(a.numerator, b.numerator), math.gcd(a.denominator, b.denominator))


def minimise(amounts: list[float], volume_ticks: list[float]) -> tuple[list[int], float, float]:
    """Integer quantities ``q``, amount ``A`` (``q * A`` = the requested amounts) and the RFQ's volume tick.

    ``A`` is the greatest common divisor of the amounts. The volume tick is the smallest size whose
    multiples give every leg a multiple of its instrument's volume tick: for leg ``i`` the sizes
    ``s`` with ``s * |q_i|`` a multiple of ``vts_i`` are the multiples of ``vts_i / |q_i|``, so the
    RFQ's tick is the least common multiple of those.
    """
    if not amounts or len(amounts) != len(volume_ticks):
        raise LegError("an RFQ needs at least one leg")
    exacts = [exact(a) for a in amounts]
    if any(a == 0 for a in exacts):
        raise LegError("every leg needs a non-zero amount")
    amount = abs(exacts[0])
    for a in exacts[1:]:
        amount = _gcd(amount, abs(a))
    quantities = [int(a / amount) for a in exacts]
    tick = exact(volume_ticks[0]) / abs(quantities[0])
    for q, vts in zip(quantities[1:], volume_ticks[1:], strict=True):
        tick = _lcm(tick, exact(vts) / abs(q))
    return quantities, float(amount), float(tick)


@dataclass(frozen=True)
class FeeLeg:
    """One leg as the fee rule sees it (per unit of the combination)."""

    underlying: str
    is_option: bool
    quantity: int
    delta: float
    """Delta of one long contract (1 for perpetuals and futures)."""
    fee_per_contract: float
    """The fee one contract would pay alone: of a spread, the cheaper leg is the one not charged."""


def fee_quantities(legs: list[FeeLeg]) -> list[float]:
    """Per leg, the quantity that pays fees.

    1. Spreads: legs of one underlying and one kind (two options, or two futures: a roll) in opposite
       directions whose delta sums to between -1 and 1, matched greedily in leg order; the matched
       quantity is charged on one leg only (the cheaper; the later one when equal).
    2. Delta hedges: a future or perpetual leg opposite to the options' net delta in its underlying is
       free up to that delta; the rest of it pays.
    """
    remaining = [float(abs(leg.quantity)) for leg in legs]
    waived = [0.0] * len(legs)
    for i, a in enumerate(legs):
        for j in range(i + 1, len(legs)):
            b = legs[j]
            if (
                a.underlying != b.underlying
                or a.is_option != b.is_option
                or (a.quantity > 0) == (b.quantity > 0)
            ):
                continue
            if abs(_signed_delta(a) + _signed_delta(b)) > 1 + 1e-12:
                continue
            matched = min(remaining[i], remaining[j])
            if matched <= 0:
                continue
            free = j if b.fee_per_contract <= a.fee_per_contract else i
            waived[free] += matched
            remaining[i] -= matched
            remaining[j] -= matched
    for underlying in {leg.underlying for leg in legs}:
        net = sum(leg.quantity * leg.delta for leg in legs if leg.is_option and leg.underlying == underlying)
        for k, leg in enumerate(legs):
            if leg.is_option or leg.underlying != underlying or net == 0 or (leg.quantity > 0) == (net > 0):
                continue
            hedge = min(remaining[k], abs(net))
            waived[k] += hedge
            remaining[k] -= hedge
            net += math.copysign(hedge, leg.quantity)
    return [round(abs(leg.quantity) - w, 10) for leg, w in zip(legs, waived, strict=True)]


def _signed_delta(leg: FeeLeg) -> float:
    return leg.delta if leg.quantity > 0 else -leg.delta


def leg_prices(quantities: list[int], marks: list[float], price: float) -> list[float]:
    """Leg prices summing to ``price`` per combination (``sum(q * p) == price``).

    The difference between ``price`` and the legs at their marks is shared in proportion to each leg's
    notional, in the direction that favours it: ``p_i = m_i * (1 + sign(q_i) * R / N)`` with
    ``R = price - sum(q * m)`` and ``N = sum(|q| * m)``; then ``sum(q_i * p_i) = sum(q * m) + R``.
    """
    notional = sum(abs(q) * m for q, m in zip(quantities, marks, strict=True))
    residual = price - sum(q * m for q, m in zip(quantities, marks, strict=True))
    share = residual / notional if notional else 0.0
    return [round(m * (1 + (share if q > 0 else -share)), 10) for q, m in zip(quantities, marks, strict=True)]
