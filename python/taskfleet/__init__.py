"""Support package for authors of taskfleet Python steps.

A step is a plain function ``def step(input)`` or ``def step(input, ctx)``; the only
type this package provides is :class:`Context`, the type of ``ctx``.
"""

from taskfleet.context import Context

__all__ = ["Context", "__version__"]

__version__ = "0.1.0"
