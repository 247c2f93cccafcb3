"""Every JSON-RPC method family of the paper exchange; importing a module registers its methods.

A new family (say mass quotes) goes in a new module using ``@METHODS.method(...)``, plus one import
line here.
"""

from services.paper.methods import (  # noqa: F401
    accounting,
    bots,
    conditional,
    market_data,
    mass_quote,
    notifications,
    rfq,
    session,
    subscriptions,
    trading,
    wallet,
)
