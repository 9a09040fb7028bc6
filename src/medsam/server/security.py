"""Security of the workbench: the bearer token, the Host allow-list, and safe ids.

* **Token.** With a token configured, every request except the page shell (``/``,
  ``/static/...``) and MONAI Label's two login routes (``/monailabel/auth/``, which says whether a
  token is needed, and ``/monailabel/auth/token``, which checks the token sent as a password) must
  carry ``Authorization: Bearer <token>``; the comparison is constant-time
  (:func:`hmac.compare_digest`). A wrong or missing token gets 401 before any route runs.
* **Host allow-list.** Requests whose ``Host`` header is not an allowed name get 400: a web page
  on another site that re-binds its DNS name to 127.0.0.1 cannot talk to the server.
* **No cross-site writes.** A POST/PUT/DELETE whose ``Origin`` is another host, or whose
  ``Sec-Fetch-Site`` is ``cross-site``/``same-site``, gets 403 (CSRF from a page in the same
  browser); no CORS headers are ever sent.
* **Ids are paths inside the data folder**, checked by :func:`safe_relative_path`: relative,
  POSIX separators, no ``..``/``.`` segments, no hidden segments (so ``.medsam`` state is not an
  image), no NUL or backslash; :func:`resolve_inside` then resolves symlinks and refuses anything
  that lands outside the folder.
"""

from __future__ import annotations

import hmac
from pathlib import Path, PurePosixPath

__all__ = [
    "PUBLIC_PATHS",
    "TokenAndHostMiddleware",
    "UnsafePathError",
    "resolve_inside",
    "safe_relative_path",
    "token_matches",
]

# The page shell carries no data, and MONAI Label clients log in through the two auth routes
# (the token route itself checks the token); everything else needs the token when one is set.
PUBLIC_PATHS = ("/", "/favicon.ico", "/monailabel/auth/", "/monailabel/auth/token")
PUBLIC_PREFIXES = ("/static/",)


_NAME_MAX = 255  # bytes in one file name on the file systems a datastore lives on


class UnsafePathError(ValueError):
    """An id or file name that could reach outside the data folder (or into its state)."""


def safe_relative_path(text: str) -> PurePosixPath:
    """Check an id / relative file name and return it as a ``PurePosixPath``.

    Refused: empty, absolute (``/x``, ``C:x``), ``\\``, NUL, control characters, ``.`` or
    ``..`` segments, empty segments (``a//b``), hidden segments (``.x``), segments over 255
    bytes (a file name no file system here stores) and over-long names.
    """
    if not isinstance(text, str) or not text or len(text) > 1024:
        raise UnsafePathError("empty or over-long path")
    if "\\" in text or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise UnsafePathError("path contains a backslash or a control character")
    if text.startswith("/") or (len(text) > 1 and text[1] == ":"):
        raise UnsafePathError("absolute paths are not accepted")
    parts = text.split("/")
    for part in parts:
        if len(part.encode("utf-8", "surrogatepass")) > _NAME_MAX:
            raise UnsafePathError(f"a path segment is longer than {_NAME_MAX} bytes")
        if part in ("", ".", ".."):
            raise UnsafePathError("'.', '..' and empty path segments are not accepted")
        if part.startswith("."):
            raise UnsafePathError("hidden path segments are not accepted")
    return PurePosixPath(*parts)


def resolve_inside(root: Path, relative: PurePosixPath) -> Path:
    """``root / relative`` with symlinks resolved; raise :class:`UnsafePathError` if it leaves
    ``root`` (``root`` must already be resolved)."""
    candidate = (root / Path(*relative.parts)).resolve(strict=False)
    if candidate != root and root not in candidate.parents:
        raise UnsafePathError("path resolves outside the data folder")
    return candidate


def token_matches(header_value: str | None, token: str) -> bool:
    """Constant-time check of an ``Authorization: Bearer <token>`` header value.

    The scheme name is case-insensitive (``bearer``, ``BEARER``; RFC 7235), the token is not.
    """
    scheme, _, given = (header_value or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        given = ""
    return hmac.compare_digest(given.strip().encode(), token.encode()) and scheme.lower() == "bearer"


def _host_name(host_header: str) -> str:
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class TokenAndHostMiddleware:
    """ASGI middleware run before any route: Host allow-list (400), bearer token for non-public
    paths (401), and a cap on request bodies (413 from ``Content-Length``; a body streamed past
    the cap is cut off, which aborts the request)."""

    def __init__(
        self, app, token: str | None, allowed_hosts: tuple[str, ...], max_body_bytes: int | None = None
    ) -> None:
        self.app = app
        self.token = token
        self.allowed = {h.lower() for h in allowed_hosts}
        self.max_body = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "websocket":  # the workbench has no websocket routes
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if "*" not in self.allowed and _host_name(headers.get("host", "")) not in self.allowed:
            await _reply(send, 400, "host not allowed")
            return
        if scope.get("method", "GET") not in ("GET", "HEAD", "OPTIONS") and not _same_origin(headers):
            await _reply(send, 403, "cross-site request refused")
            return
        path = scope.get("path", "")
        public = path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)
        if self.token and not public and not token_matches(headers.get("authorization"), self.token):
            await _reply(send, 401, "missing or wrong bearer token", {"www-authenticate": "Bearer"})
            return
        if self.max_body is not None:
            try:
                declared = int(headers.get("content-length", "0") or 0)
            except ValueError:
                await _reply(send, 400, "bad Content-Length")
                return
            if declared > self.max_body:
                await _reply(send, 413, f"request body larger than {self.max_body} bytes")
                return
            receive = _capped(receive, self.max_body)
        await self.app(scope, receive, send)


def _same_origin(headers: dict[str, str]) -> bool:
    """False for a browser request made by another site (CSRF): its ``Origin`` names another
    host, or ``Sec-Fetch-Site`` says cross-site. Non-browser clients send neither."""
    if headers.get("sec-fetch-site", "same-origin") in ("cross-site", "same-site"):
        return False
    origin = headers.get("origin")
    if origin is None:
        return True
    from urllib.parse import urlsplit

    try:
        netloc = urlsplit(origin).netloc.lower()
    except ValueError:
        return False
    return bool(netloc) and netloc == headers.get("host", "").strip().lower()


def _capped(receive, limit: int):
    seen = 0

    async def wrapped():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                return {"type": "http.disconnect"}
        return message

    return wrapped


async def _reply(send, status: int, detail: str, extra: dict[str, str] | None = None) -> None:
    import json

    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
