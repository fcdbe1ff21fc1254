"""Re-export: `UserError` is defined once, in trainable/errors.py (the bottom of the data flow)."""

from trainable.errors import UserError

__all__ = ["UserError"]
