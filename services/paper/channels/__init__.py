"""Every channel family of the paper exchange; importing a module registers its channels.

A new family (say conditional orders) goes in a new module registering its ``Family`` and
``ROUTES``, plus one import line here.
"""

from services.paper.channels import account, bots, conditional, market, mm_protection, rfq, system  # noqa: F401
from services.paper.channels.registry import (
    CHANNELS,
    DELAYS,
    ROUTES,
    Channel,
    Family,
    NotAChannel,
    Subscriptions,
)

__all__ = ["CHANNELS", "DELAYS", "ROUTES", "Channel", "Family", "NotAChannel", "Subscriptions"]
