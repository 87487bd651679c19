"""Who is asking, and may they: login and per-user data for shared servers and Spaces.

Locally with no `--auth` there is one person and one data folder. With `--auth user:password` (or
DREAMBOOTH_STUDIO_AUTH), or on a Hugging Face Space, every action needs a logged-in user, each user
gets a data folder of their own (`<data>/users/<name>/`) and sees only their photos, runs and
adapters, and only allowed users may use the app: on a Space its owner plus the users listed in
DREAMBOOTH_STUDIO_USERS; with --auth, the accounts given.

The user comes from Gradio's password login (`request.username`), from the Hugging Face OAuth
session (the page's "Sign in with Hugging Face" button on a Space), or, for `gradio_client` calls on
a Space, from the Hub token it sends (`x-hf-authorization: Bearer hf_...`), resolved with the Hub's
whoami once per token; the token itself is neither kept nor logged.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class AccessDenied(Exception):
    """The sentence says what to do (log in, or use your own copy of the Space)."""


def parse_auth(text: str | None) -> list[tuple[str, str]]:
    """`user:password[,user:password...]` -> [(user, password)]; ValueError naming the problem."""
    pairs = []
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        user, sep, password = item.partition(":")
        if not sep or not user.strip() or not password:
            raise ValueError("auth: give accounts as user:password[,user:password]")
        pairs.append((user.strip(), password))
    return pairs


@dataclass(frozen=True)
class AccessPolicy:
    required: bool  # every action needs a logged-in user
    allowed: frozenset[str] | None  # None: any logged-in user
    oauth: bool  # offer "Sign in with Hugging Face" (on a Space)

    @classmethod
    def from_env(
        cls, deployment, auth: list[tuple[str, str]], env: Mapping[str, str] | None = None
    ) -> AccessPolicy:
        env = os.environ if env is None else env
        listed = {u.strip() for u in (env.get("DREAMBOOTH_STUDIO_USERS") or "").split(",") if u.strip()}
        if deployment.on_space:
            allowed = {deployment.owner, *listed, *(u for u, _ in auth)} - {None}
            return cls(required=True, allowed=frozenset(allowed), oauth=True)
        if auth:
            return cls(required=True, allowed=frozenset({u for u, _ in auth} | listed), oauth=False)
        return cls(required=False, allowed=None, oauth=False)

    def check(self, user: str | None) -> str | None:
        """The user to serve (None: the single local user); AccessDenied otherwise."""
        if not self.required:
            return None
        if not user:
            how = (
                "with the Sign in with Hugging Face button"
                if self.oauth
                else "with your user name and password"
            )
            raise AccessDenied(f"Log in first ({how}); every photo, run and adapter here belongs to a user.")
        if self.allowed is not None and user not in self.allowed:
            raise AccessDenied(
                f"{user} may not use this app: it is private to its owner. Duplicate the Space to train your own."
            )
        return user


class TokenUsers:
    """Hub token -> user name, through huggingface_hub's whoami, remembered for an hour by hash."""

    def __init__(self, whoami: Callable[[str], str] | None = None, ttl: float = 3600.0) -> None:
        self._whoami = whoami or _hub_whoami
        self._ttl = ttl
        self._cache: dict[str, tuple[float, str | None]] = {}
        self._lock = threading.Lock()

    def __call__(self, token: str) -> str | None:
        key = hashlib.sha256(token.encode()).hexdigest()
        with self._lock:
            hit = self._cache.get(key)
            if hit and time.monotonic() - hit[0] < self._ttl:
                return hit[1]
        try:
            user = self._whoami(token)
        except Exception as e:  # noqa: BLE001 - a bad or expired token is simply "not logged in"
            log.info("a Hub token was not accepted (%s)", type(e).__name__)
            user = None
        with self._lock:
            self._cache[key] = (time.monotonic(), user)
        return user


def _hub_whoami(token: str) -> str:
    from huggingface_hub import whoami

    return whoami(token=token)["name"]


def request_user(request, token_users: Callable[[str], str | None] | None = None) -> str | None:
    """The logged-in user of a Gradio request: password login, OAuth session, or a Bearer Hub token."""
    if request is None:
        return None
    username = getattr(request, "username", None)
    if username:
        return str(username)
    try:
        session = request.session  # only present when OAuth (a SessionMiddleware) is set up
    except (AssertionError, AttributeError, KeyError):
        session = None
    info = session.get("oauth_info") if isinstance(session, Mapping) else None
    if info and (info.get("expires_at") is None or info["expires_at"] > time.time()):
        user = (info.get("userinfo") or {}).get("preferred_username")
        if user:
            return str(user)
    if token_users is not None:
        # gradio_client sends the token of `Client(..., token=)` in x-hf-authorization.
        try:
            header = request.headers.get("x-hf-authorization") or request.headers.get("authorization") or ""
        except AttributeError:
            header = ""
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token_users(token.strip())
    return None


class PrivateFiles:
    """ASGI middleware: Gradio's file route never serves anything inside the data folder by path.

    The page and the API never need such a URL: Gradio copies whatever a handler returns into its
    own cache under a content hash it salts with a server secret, and the browser loads that copy.
    A path typed by hand (`/gradio_api/file=<data>/users/<someone>/...`) is refused for every
    user, the folder's owner included, so no user can reach another user's files by URL.
    `exempt` names folders inside the data folder Gradio itself serves from (its cache, should
    GRADIO_TEMP_DIR point there).
    """

    _FILE_ROUTE = re.compile(r"/file(?:=|/)(.+)$")

    def __init__(self, app, root: str | os.PathLike, exempt: tuple[str, ...] = ()) -> None:
        self.app = app
        self.root = Path(root).resolve()
        self.exempt = tuple(Path(e).resolve() for e in exempt)

    def refuses(self, url_path: str) -> bool:
        match = self._FILE_ROUTE.search(url_path)
        if not match or "://" in match.group(1):
            return False
        asked = Path(match.group(1))
        try:
            candidates = {Path(os.path.abspath(asked)), asked.resolve()}
        except (OSError, RuntimeError, ValueError):  # a path that cannot even be resolved: refuse it
            return True
        for candidate in candidates:
            if candidate.is_relative_to(self.root) and not any(
                candidate.is_relative_to(e) for e in self.exempt
            ):
                return True
        return False

    async def __call__(self, scope, receive, send) -> None:
        if scope.get("type") == "http" and self.refuses(scope.get("path", "")):
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8")]})  # fmt: skip
            await send({"type": "http.response.body", "body": b"File not allowed."})
            return
        await self.app(scope, receive, send)
