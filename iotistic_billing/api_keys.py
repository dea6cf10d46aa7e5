"""Instance usage keys: made by the operator, put in the licence Secret, stored only as SHA-256."""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta
from typing import Final

PREFIX = "iuk_"
# How long a customer's older usage keys keep working once its licence Secret got a new one (the Secret
# was deleted): the new licence rolls the instance's pods, which read the key from their environment,
# and a report they send meanwhile is still accepted.
ROTATION_GRACE: Final = timedelta(minutes=10)


def new_usage_key() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def usage_key_hash(key: str) -> str:
    """The one form a usage key is stored and looked up in."""
    # surrogateescape: a header that is not UTF-8 reaches us as surrogate-escaped str (aiohttp); it is
    # hashed as the bytes sent, so it finds no key instead of raising.
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
