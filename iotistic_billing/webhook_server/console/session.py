"""Console sessions: a sealed cookie (Fernet: encrypted and authenticated, with a lifetime) that says the
role, the CSRF token of the session and which token signed it in, so that rotating a token ends the
sessions it opened. No state on the server: every replica reads the same cookie."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from typing import Final, Literal

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from iotistic_billing.settings import Settings

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


class Sessions:
    """Opens, seals and reads sessions with a key derived from the admin token (no setting of its own;
    every replica derives the same)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        admin = settings.admin_api_token
        self._fernet = (
            Fernet(
                base64.urlsafe_b64encode(
                    HKDF(
                        algorithm=hashes.SHA256(), length=32, salt=None, info=b"iotistic-console-session"
                    ).derive(admin.get_secret_value().encode())
                )
            )
            if admin is not None
            else None
        )

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
