"""Who may do what: API keys, JWTs, anonymous clients and allowed origins.

Credentials (docs/protocol.md, Auth):

- ``Authorization: Bearer <credential>`` on HTTP and on the WebSocket handshake, or
  ``?token=<jwt>`` on the WebSocket (browsers cannot set headers; API keys are not
  taken from URLs, which end up in logs and browser histories).
- An API key is one of ``api_keys``, compared in constant time. It is a backend's
  secret and grants everything: publish, history and subscribe on every topic, and the
  operator API (disconnects), which no token may use.
- A JWT is verified with PyJWT: HS256 with ``jwt_secret``; RS256 or ES256 (whichever
  the PEM key in ``jwt_public_key`` is for) with that key. The algorithm picks the key,
  so an HS256 token is never checked against the public key, and ``alg: none`` or any
  other algorithm is refused. ``sub`` and ``exp`` are required; the claim
  ``"squall": {"subscribe": [...], "publish": [...], "info": {...}}`` lists topic
  patterns, and ``info`` (optional, an object of at most ``MAX_INFO_BYTES`` as JSON)
  travels with the client into presence entries, join and leave frames and webhooks.
- No credential: anonymous, which may subscribe to ``public_topics`` and publish
  nowhere. A credential that is present but bad is refused (401, or close 4001), never
  downgraded to anonymous. An empty ``?token=`` counts as none.
- With no API key, no JWT key and no authorization webhook configured, auth is off
  and everyone may do everything (the server warns at start). An authorization
  webhook alone turns it on: clients start anonymous and the webhook grants more.

A subscription pattern is allowed when every topic it can match is matched by one
granted pattern (``covers``): ``orders.*`` is covered by ``orders.*`` and ``orders.>``,
not by ``orders.eu``; ``>`` only by ``>``.

Token expiry: a WebSocket whose token expires is closed with 4001 at ``exp`` (an
IOLoop ``call_at``). There is no refresh frame: the client reconnects with a new
token and resumes each subscription with ``since``, which loses no event, and the
server keeps one way in for credentials instead of two.

Secrets never leave this module in a message: errors name what is wrong (expired,
bad signature), never the token, the key or the secret. ``redacted_uri`` masks
every credential-looking query parameter (``token``, ``api_key``, ...) in URLs
before they are logged.
"""

from __future__ import annotations

import hmac
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

import jwt

from server.codec import MAX_DEPTH, dump_json, load_json
from server.errors import SquallError
from server.topics import TAIL, InvalidTopic, covers, validate_pattern

if TYPE_CHECKING:
    from tornado.httputil import HTTPServerRequest

    from config.settings import Settings

log = logging.getLogger("squall.auth")

CLAIM = "squall"
MAX_TOKEN_LENGTH = 8192
MAX_INFO_BYTES = 1024  # the squall.info claim, as JSON (docs/protocol.md)
MIN_SECRET_BYTES = 32  # RFC 7518, 3.2: an HS256 key as long as the hash
FAR_FUTURE = 2**40  # seconds since 1970 (the year 36812): later expiries are capped here
EVERYTHING = (TAIL,)


class Unauthorized(SquallError):
    """The credential is missing where one is needed, or it is not valid."""

    def __init__(self, message: str) -> None:
        super().__init__("unauthorized", message)


class Forbidden(SquallError):
    """The client is known, but may not do this."""

    def __init__(self, message: str) -> None:
        super().__init__("forbidden", message)


# -- grants ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Grant:
    """What one client may do. ``expires_at`` is Unix time; ``limit_key`` names the
    client for rate limits (never the credential itself); ``info`` is the token's
    ``squall.info`` object (presence entries, join and leave frames, webhooks);
    ``operator``: an API key (or anyone, with auth off), which may use the operator API."""

    sub: str | None
    subscribe: tuple[str, ...] = ()
    publish: tuple[str, ...] = ()
    expires_at: float | None = None
    limit_key: str | None = None
    anonymous: bool = False
    info: Mapping[str, Any] | None = field(default=None, compare=False)
    operator: bool = False

    def may_subscribe(self, pattern: str) -> bool:
        return self.subscribe == EVERYTHING or any(
            covers(granted, pattern) for granted in self.subscribe)

    def may_publish(self, topic: str) -> bool:
        return self.publish == EVERYTHING or any(
            covers(granted, topic) for granted in self.publish)

    def check_subscribe(self, pattern: str) -> None:
        """Raise ``Forbidden`` unless ``pattern`` may be subscribed to (or read)."""
        if not self.may_subscribe(pattern):
            raise Forbidden(f"{self._who()} may not subscribe to {pattern!r}")

    def check_publish(self, topic: str) -> None:
        """Raise ``Forbidden`` unless ``topic`` may be published to."""
        if not self.may_publish(topic):
            raise Forbidden(f"{self._who()} may not publish to {topic!r}")

    def check_operator(self, what: str) -> None:
        """Raise unless this is an API key's grant: ``Unauthorized`` without a credential,
        ``Forbidden`` for a token. ``what`` names the operation in the message."""
        if self.operator:
            return
        if self.anonymous:
            raise Unauthorized(f"{what} needs an API key: send Authorization: Bearer <key>")
        raise Forbidden(f"{what} needs an API key; a token may not")

    def _who(self) -> str:
        return "an anonymous client" if self.anonymous else "this credential"


OPEN = Grant(sub=None, subscribe=EVERYTHING, publish=EVERYTHING, operator=True)


def authorize(rights: Grant, check: Callable[[str], None], name: str) -> None:
    """``check(name)`` (one of the grant's checks); a refused anonymous request is told
    to authenticate (401), any other refusal stands (403)."""
    try:
        check(name)
    except Forbidden as exc:
        if rights.anonymous:
            raise Unauthorized(f"{exc.message}: send an API key or a token") from None
        raise


# -- the verifier ---------------------------------------------------------------------


class Auth:
    """Turns credentials into ``Grant``s and says which origins are allowed.

    Holds the keys; never logs or repeats them. Build it with ``from_settings``.
    """

    def __init__(self, *, api_keys: Sequence[str] = (), jwt_secret: str = "",
                 public_key: Any = None, public_algorithm: str = "",
                 public_topics: Sequence[str] = (), allowed_origins: Sequence[str] = (),
                 backend_decides: bool = False) -> None:
        self._api_keys = tuple(key.encode() for key in api_keys)
        self._keys: dict[str, Any] = {}
        if jwt_secret:
            self._keys["HS256"] = jwt_secret.encode()
        if public_key is not None:
            self._keys[public_algorithm] = public_key
        self._short_secret = 0 < len(jwt_secret.encode()) < MIN_SECRET_BYTES
        # an authorization webhook turns auth on: the backend decides, never nobody
        self.enabled = bool(self._api_keys or self._keys or backend_decides)
        self.public = Grant(sub=None, subscribe=tuple(public_topics), anonymous=True)
        self.origins = _Origins(allowed_origins)
        if self._short_secret:
            log.warning("jwt_secret is shorter than %d bytes; use a longer random secret",
                        MIN_SECRET_BYTES)

    @classmethod
    def from_settings(cls, settings: Settings) -> Auth:
        """The verifier for ``settings``; reads the public key file (at start only)."""
        key, algorithm = None, ""
        if settings.jwt_public_key:
            with open(settings.jwt_public_key, "rb") as handle:
                key, algorithm = load_public_key(handle.read())
        return cls(api_keys=settings.api_keys, jwt_secret=settings.jwt_secret,
                   public_key=key, public_algorithm=algorithm,
                   public_topics=settings.public_topics,
                   allowed_origins=settings.allowed_origins,
                   backend_decides=bool(settings.auth_webhook_url))

    def http_grant(self, authorization: str | None) -> Grant:
        """The grant of an HTTP request with this ``Authorization`` header."""
        if not self.enabled:
            return OPEN
        return self.grant(bearer(authorization), key_allowed=True)

    def ws_grant(self, token: str | None, authorization: str | None) -> Grant:
        """The grant of a WebSocket handshake: ``?token=`` first, else the header."""
        if token:
            return self.grant(token, key_allowed=False)
        return self.http_grant(authorization)

    def grant(self, credential: str | None, key_allowed: bool = True) -> Grant:
        """What ``credential`` allows; raises ``Unauthorized`` for a bad one."""
        if not self.enabled:
            return OPEN
        if credential is None:
            return self.public
        if len(credential) > MAX_TOKEN_LENGTH:
            raise Unauthorized(f"the credential is longer than {MAX_TOKEN_LENGTH} characters")
        if key_allowed and self._api_keys:
            index = self._key_index(credential.encode())
            if index is not None:
                return Grant(sub=None, subscribe=EVERYTHING, publish=EVERYTHING,
                             limit_key=f"key:{index}", operator=True)
        if not self._keys:
            raise Unauthorized("not a known API key" if self._api_keys else
                               "this server takes no credentials: its authorization "
                               "webhook decides")
        return self._token_grant(self._decode(credential))

    def _key_index(self, offered: bytes) -> int | None:
        """The matching key's position; every key is compared, in constant time each."""
        found = None
        for index, key in enumerate(self._api_keys):
            if hmac.compare_digest(offered, key):
                found = index
        return found

    def _decode(self, token: str) -> dict[str, Any]:
        try:
            algorithm = jwt.get_unverified_header(token).get("alg")
        except jwt.PyJWTError:
            raise Unauthorized("not a known API key or a well-formed token") from None
        key = self._keys.get(algorithm) if isinstance(algorithm, str) else None
        if key is None or not isinstance(algorithm, str):
            raise Unauthorized(f"token algorithm not accepted; use one of "
                               f"{', '.join(sorted(self._keys))}")
        try:
            with warnings.catch_warnings():
                if self._short_secret:  # warned once at start instead of every time
                    warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
                claims: dict[str, Any] = jwt.decode(
                    token, key, algorithms=[algorithm],
                    options={"require": ["exp", "sub"]})
        except jwt.PyJWTError as exc:
            raise Unauthorized(_token_problem(exc)) from None
        return claims

    def _token_grant(self, claims: dict[str, Any]) -> Grant:
        sub, exp = claims["sub"], claims["exp"]
        if not isinstance(sub, str):
            raise Unauthorized("the token's 'sub' claim must be a string")
        if not _valid_text(sub):
            raise Unauthorized("the token's 'sub' claim is not valid Unicode (a lone "
                               "surrogate)")
        if isinstance(exp, bool) or not isinstance(exp, int | float) or (
                isinstance(exp, float) and math.isnan(exp)):
            raise Unauthorized("the token's 'exp' claim must be a number (seconds since 1970)")
        rights = claims.get(CLAIM, {})
        if not isinstance(rights, dict):
            raise Unauthorized(f"the token's {CLAIM!r} claim must be an object")
        return Grant(sub=sub, subscribe=_patterns(rights, "subscribe") + self.public.subscribe,
                     publish=_patterns(rights, "publish"),
                     expires_at=float(min(exp, FAR_FUTURE)),
                     limit_key=f"sub:{sub}", info=_info(rights))

    def origin_allowed(self, origin: str, host: str) -> bool:
        """Whether a browser page from ``origin`` may use this server reached as ``host``."""
        return self.origins.allowed(origin, host)


def _token_problem(exc: jwt.PyJWTError) -> str:
    """A fixed description of a token error: PyJWT's own messages are not shown."""
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "the token has expired"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"the token has no {exc.claim!r} claim"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "the token's signature does not verify"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "the token is not valid yet"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "the token names an audience ('aud'); this server accepts none"
    if isinstance(exc, jwt.DecodeError):
        return "the token is malformed"
    return "the token is not valid"


def _patterns(rights: dict[str, Any], action: str) -> tuple[str, ...]:
    listed = rights.get(action, [])
    if not isinstance(listed, list) or not all(isinstance(item, str) for item in listed):
        raise Unauthorized(f"the token's {CLAIM}.{action} claim must be a list of patterns")
    try:
        return tuple(validate_pattern(item) for item in listed)
    except InvalidTopic:
        raise Unauthorized(f"the token's {CLAIM}.{action} claim has an invalid pattern") from None


def _info(rights: dict[str, Any]) -> dict[str, Any] | None:
    """The ``squall.info`` object: at most ``MAX_INFO_BYTES`` as JSON, or ``Unauthorized``."""
    info = rights.get("info")
    if info is None:
        return None
    if not isinstance(info, dict):
        raise Unauthorized(f"the token's {CLAIM}.info claim must be an object, not "
                           f"{type(info).__name__}")
    try:
        encoded = dump_json(info)
        load_json(encoded)  # the checks of every client value: 64-bit integers, depth
    except (SquallError, ValueError, TypeError, RecursionError):
        raise Unauthorized(f"the token's {CLAIM}.info claim must be a value every codec "
                           f"can carry: integers within 64 bits, at most {MAX_DEPTH} "
                           "levels, valid Unicode") from None
    if len(encoded) > MAX_INFO_BYTES:
        raise Unauthorized(f"the token's {CLAIM}.info claim is {len(encoded)} bytes as "
                           f"JSON; the limit is {MAX_INFO_BYTES}")
    return info


def _valid_text(text: str) -> bool:
    """Whether ``text`` has no lone surrogate (JSON lets ``"\\ud800"`` through)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def bearer(authorization: str | None) -> str | None:
    """The credential of ``Authorization: Bearer <credential>``; None without a header."""
    if authorization is None:
        return None
    scheme, _, credential = authorization.strip().partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential:
        raise Unauthorized("the Authorization header must be 'Bearer <API key or token>'")
    return credential


# -- public keys and tokens -----------------------------------------------------------


def load_public_key(pem: bytes) -> tuple[Any, str]:
    """A PEM public key and the one algorithm it verifies: RS256 (RSA) or ES256 (P-256).

    Raises ``ValueError`` with a one-line reason.
    """
    reason = "is not an RSA or EC public key in PEM form"
    for algorithm in ("RS256", "ES256"):
        try:
            key = jwt.get_algorithm_by_name(algorithm).prepare_key(pem)
        except jwt.InvalidKeyError as exc:
            if "curve" in str(exc):
                reason = "holds an EC key on a curve other than P-256, which ES256 needs"
            continue
        except (ValueError, TypeError):
            continue
        if hasattr(key, "private_bytes"):
            raise ValueError("holds a private key; give the public key only")
        return key, algorithm
    raise ValueError(reason)


def issue_token(secret: str, sub: str, subscribe: Iterable[str] = (),
                publish: Iterable[str] = (), ttl: float = 3600,
                now: float | None = None, info: Mapping[str, Any] | None = None) -> str:
    """An HS256 JWT for ``sub`` with these patterns (and ``info``), valid ``ttl`` seconds
    (development)."""
    issued = time.time() if now is None else now
    rights: dict[str, Any] = {"subscribe": list(subscribe), "publish": list(publish)}
    if info is not None:
        rights["info"] = dict(info)
    claims = {"sub": sub, "iat": int(issued), "exp": int(issued + ttl), CLAIM: rights}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
        return jwt.encode(claims, secret, algorithm="HS256")


# -- origins --------------------------------------------------------------------------


class _Origins:
    """``allowed_origins``: empty for same origin only, ``*`` for all, else a list.

    The same origin (the Origin's host and port equal the Host header) is always
    allowed: its pages are this server's own.
    """

    def __init__(self, allowed: Sequence[str]) -> None:
        self.any = "*" in allowed
        self.listed = frozenset(normalize_origin(origin) for origin in allowed if origin != "*")

    def allowed(self, origin: str, host: str) -> bool:
        if self.any:
            return True
        normal = normalize_origin(origin)
        if normal in self.listed:
            return True
        _, scheme_found, netloc = normal.partition("://")
        return bool(scheme_found and netloc) and netloc == host.strip().lower()


def normalize_origin(origin: str) -> str:
    """``scheme://host[:port]`` in lower case, without a trailing slash."""
    return origin.strip().rstrip("/").lower()


def request_summary(request: HTTPServerRequest) -> str:
    """``METHOD uri (ip)`` for log lines, with the URI's token masked."""
    return f"{request.method} {redacted_uri(request.uri or '')} ({request.remote_ip})"


# query parameter names whose values are masked in logs: any name holding one of these
CREDENTIAL_WORDS = ("token", "key", "secret", "password", "passwd", "auth", "sig",
                    "session", "jwt", "credential", "cookie")


def is_credential(name: str) -> bool:
    """Whether a query parameter's name says its value is a credential."""
    lowered = name.lower()
    return any(word in lowered for word in CREDENTIAL_WORDS)


def redacted_uri(uri: str) -> str:
    """``uri`` with the value of every credential-looking query parameter masked
    (``token``, ``api_key``, ``access_token``, ``key``, ...), for logs."""
    path, _, raw_query = uri.partition("?")  # as Tornado splits it: '#' is no delimiter
    if not raw_query:
        return uri
    query = parse_qsl(raw_query, keep_blank_values=True)
    if not any(is_credential(name) for name, _ in query):
        return uri
    masked = [(name, "***" if is_credential(name) else value) for name, value in query]
    return f"{path}?{urlencode(masked, safe='*.>:@')}"
