"""Console sessions: a sealed cookie (Fernet: encrypted and authenticated, with a lifetime) that says the
role, the CSRF token of the session and which token signed it in, so that rotating a token ends the
sessions it opened. No state on the server: every replica reads the same cookie, sealed with the key of
CONSOLE_SESSION_KEY."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
from dataclasses import dataclass
from typing import Final, Literal

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import SecretStr

from iotistic_billing.settings import Settings

log = logging.getLogger(__name__)

Role = Literal["admin", "viewer"]
COOKIE: Final = "iotistic_console"
LIFETIME_SECONDS: Final = 8 * 3600


@dataclass(frozen=True)
class ConsoleSession:
    role: Role
    csrf: str
    token_tag: str  # a hash of the token that signed in: the session ends when that token changes

    @property
    def may_act(self) -> bool:
        return self.role == "admin"


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
                return ConsoleSession(role, secrets.token_urlsafe(32), _tag(expected))
        return None

    def seal(self, session: ConsoleSession) -> str:
        assert self._fernet is not None
        body = {"role": session.role, "csrf": session.csrf, "tag": session.token_tag}
        return self._fernet.encrypt(json.dumps(body).encode()).decode()

    def read(self, cookie: str | None) -> ConsoleSession | None:
        """The session of a cookie still valid (sealed by us, within its lifetime, its token unchanged)."""
        if not cookie or self._fernet is None:
            return None
        try:
            body = json.loads(self._fernet.decrypt(cookie.encode(), ttl=LIFETIME_SECONDS))
        except (InvalidToken, ValueError):
            return None
        role = body.get("role")
        token = _tokens(self.settings).get(role) if role in ("admin", "viewer") else None
        if token is None or not hmac.compare_digest(str(body.get("tag")), _tag(token)):
            return None
        return ConsoleSession(role, str(body.get("csrf")), str(body.get("tag")))


__all__ = ["COOKIE", "LIFETIME_SECONDS", "ConsoleSession", "Role", "Sessions"]
