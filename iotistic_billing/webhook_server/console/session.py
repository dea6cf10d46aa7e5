"""Console sessions: a sealed cookie (Fernet: encrypted and authenticated, with a lifetime) that says the
role, the CSRF token of the session and which token signed it in, so that rotating a token ends the
sessions it opened. Every replica reads the same cookie, sealed with the key of CONSOLE_SESSION_KEY; the
only state on the server is the sessions signed out before their end (console_signouts, by `id`; SignOuts)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, Literal

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import SecretStr

from iotistic_billing.db.pool import database_unreachable
from iotistic_billing.settings import Settings

log = logging.getLogger(__name__)

Role = Literal["admin", "viewer"]
COOKIE: Final = "iotistic_console"
LIFETIME_SECONDS: Final = 8 * 3600
# A sign-out is kept this long past its session's end: a replica whose clock is behind PostgreSQL's
# still reads the cookie as open that much longer (Fernet takes up to 60 s of skew).
SIGN_OUT_MARGIN: Final = timedelta(seconds=60)


@dataclass(frozen=True)
class ConsoleSession:
    role: Role
    csrf: str
    token_tag: str  # a hash of the token that signed in: the session ends when that token changes
    issued_at: int  # seconds since the epoch, sealed in the cookie (Fernet's timestamp)

    @property
    def may_act(self) -> bool:
        return self.role == "admin"

    @property
    def id(self) -> str:
        """What a sign-out records: a hash of the session's CSRF token, its one value of its own."""
        return hashlib.sha256(("iotistic-console-session\n" + self.csrf).encode()).hexdigest()

    @property
    def expires_at(self) -> datetime:
        return datetime.fromtimestamp(self.issued_at + LIFETIME_SECONDS, UTC)


def _tag(token: str) -> str:
    return hashlib.sha256(("iotistic-console\n" + token).encode()).hexdigest()[:16]


def _tokens(settings: Settings) -> dict[Role, str]:
    tokens: dict[Role, str] = {}
    if settings.admin_api_token is not None:
        tokens["admin"] = settings.admin_api_token.get_secret_value()
    if settings.admin_viewer_token is not None:
        tokens["viewer"] = settings.admin_viewer_token.get_secret_value()
    return tokens


def _sealing_key(secret: SecretStr | None) -> bytes:
    """The Fernet key of CONSOLE_SESSION_KEY; unset, a random key of this process, whose sessions end
    with it and that no other replica reads."""
    if secret is None:
        log.warning(
            "CONSOLE_SESSION_KEY is not set: the console's sessions are sealed with a key of this process;"
            " they end when it restarts and another replica does not read them"
        )
        return Fernet.generate_key()
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"iotistic-console-session").derive(
        secret.get_secret_value().encode()
    )
    return base64.urlsafe_b64encode(key)


class Sessions:
    """Opens, seals and reads sessions. The sealing key comes from CONSOLE_SESSION_KEY alone: one derived
    from a token would make every cookie a way to test guesses of that token offline."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        configured = settings.admin_api_token is not None
        self._fernet = Fernet(_sealing_key(settings.console_session_key)) if configured else None

    @property
    def configured(self) -> bool:
        return self._fernet is not None

    def sign_in(self, token: str) -> ConsoleSession | None:
        """The session a token opens, or None when it is neither the admin nor the viewer token."""
        for role, expected in _tokens(self.settings).items():
            if hmac.compare_digest(token.encode(), expected.encode()):
                return ConsoleSession(role, secrets.token_urlsafe(32), _tag(expected), int(time.time()))
        return None

    def seal(self, session: ConsoleSession) -> str:
        assert self._fernet is not None
        body = {"role": session.role, "csrf": session.csrf, "tag": session.token_tag}
        return self._fernet.encrypt_at_time(json.dumps(body).encode(), session.issued_at).decode()

    def read(self, cookie: str | None) -> ConsoleSession | None:
        """The session of a cookie still valid (sealed by us, within its lifetime, its token unchanged)."""
        if not cookie or self._fernet is None:
            return None
        try:
            body = json.loads(self._fernet.decrypt(cookie.encode(), ttl=LIFETIME_SECONDS))
            issued_at = self._fernet.extract_timestamp(cookie.encode())
        except (InvalidToken, ValueError):
            return None
        role = body.get("role")
        token = _tokens(self.settings).get(role) if role in ("admin", "viewer") else None
        if token is None or not hmac.compare_digest(str(body.get("tag")), _tag(token)):
            return None
        return ConsoleSession(role, str(body.get("csrf")), str(body.get("tag")), issued_at)


class SignOuts:
    """The sessions signed out before their end, as this replica last read them (`load`: console_signouts),
    read again once `max_age` seconds old, so that a sign-out on another replica counts here within that.
    PostgreSQL away, the last read stands: the pages that need no PostgreSQL stay up (a replica started
    while it is away knows only its own sign-outs until it is back)."""

    def __init__(
        self,
        load: Callable[[], Awaitable[set[str]]],
        max_age: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        timeout: float = 2.0,
    ) -> None:
        self._load = load
        self._max_age = max_age
        self._timeout = timeout
        self._clock = clock
        self._ids: set[str] = set()
        self._read_at: float | None = None
        self._lock = asyncio.Lock()

    async def includes(self, session_id: str) -> bool:
        # While one request reads, the others answer from the last read rather than wait for it.
        if self._stale() and not (self._lock.locked() and self._read_at is not None):
            async with self._lock:
                if self._stale():  # not read meanwhile by a request that held the lock
                    await self._read()
        return session_id in self._ids

    def add(self, session_id: str) -> None:
        """This replica's own sign-out, recorded: counted at once, before the next read."""
        self._ids.add(session_id)

    def _stale(self) -> bool:
        return self._read_at is None or self._clock() - self._read_at >= self._max_age

    async def _read(self) -> None:
        before = set(self._ids)
        try:
            # Bounded: a PostgreSQL that does not answer (failed over, its address silent) is away too.
            # Not by wait_for, which kept a read that came in with the request's cancellation and dropped
            # the cancellation (see workers.py): the page of a request gone away went on being served.
            async with asyncio.timeout(self._timeout):
                ids = await self._load()
        except Exception as error:
            if not database_unreachable(error):
                raise
            log.warning("console: sign-outs not read (%s): the last read stands", type(error).__name__)
        else:
            # A sign-out of this replica's during the read may have committed after its SELECT: kept.
            self._ids = ids | (self._ids - before)
        # Read again max_age later either way: PostgreSQL away is not asked on every request.
        self._read_at = self._clock()


__all__ = ["COOKIE", "LIFETIME_SECONDS", "SIGN_OUT_MARGIN", "ConsoleSession", "Role", "Sessions", "SignOuts"]
