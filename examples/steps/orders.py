"""Example step module: pricing orders.

Run with a worker started as ``taskfleet-worker --python-path examples/steps``.
"""

from taskfleet import Context

TAX_RATE = 0.2


def price(orders, ctx: Context):
    """Adds a taxed price to each order line; ``orders`` is a list of dicts."""
    ctx.logger.info("pricing %d orders (attempt %d)", len(orders), ctx.attempt)
    return [
        {**order, "price": round(order["qty"] * order["unit_price"] * (1 + TAX_RATE), 2)}
        for order in orders
    ]


def summarize(totals):
    """Formats the totals computed by the jq step."""
    return {"summary": f"{totals['lines']} lines, {totals['total']:.2f} in all", **totals}


def explode(_input):
    """Always fails; used to show how errors are reported."""
    raise ValueError("this step always fails")
