"""Property tests and fuzzing of what auth reads from the outside: patterns,
Authorization headers, tokens, origins, URLs; in process and against a real server."""

from __future__ import annotations

import http.client
import itertools
import json
import math
from urllib.parse import parse_qsl, urlsplit

import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from server.auth import MAX_TOKEN_LENGTH, Auth, Unauthorized, covers, redacted_uri
from server.topics import matches
from tests.auth_support import API_KEY, SECRET, token
from tests.server_process import ServerProcess

# -- pattern containment against brute force ---------------------------------------------

SEGMENTS = st.sampled_from(["a", "b", "*"])


@st.composite
def patterns(draw: st.DrawFn) -> str:
    """Patterns of 1 to 4 segments over a, b and *, maybe ending in >."""
    segments = draw(st.lists(SEGMENTS, min_size=1, max_size=4))
    if draw(st.booleans()):
        segments = [*segments[:-1], ">"]
    return ".".join(segments)


def topics_up_to(length: int) -> list[str]:
    """Every topic over a, b, c ("c": a name no pattern spells) up to ``length`` segments."""
    return [".".join(parts) for size in range(1, length + 1)
            for parts in itertools.product("abc", repeat=size)]


TOPICS = topics_up_to(5)


@settings(max_examples=2000, deadline=None)
@given(patterns(), patterns())
def test_covers_is_containment_of_matched_topics(granted, requested):
    # a topic one segment longer than both patterns tells a finite pattern from a '>'
    contained = all(matches(granted, topic) for topic in TOPICS if matches(requested, topic))
    assert covers(granted, requested) is contained


# -- credentials in process ------------------------------------------------------------

AUTH = Auth(api_keys=(API_KEY,), jwt_secret=SECRET, public_topics=("news.>",),
            allowed_origins=("https://app.example.com",))

TEXT = st.text(st.characters(codec="utf-8"), max_size=300)
TOKENISH = st.builds(".".join, st.lists(
    st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=", max_size=60),
    min_size=1, max_size=4))
HEADER = st.one_of(TEXT, st.builds(lambda rest: "Bearer " + rest, st.one_of(TEXT, TOKENISH)))


@settings(max_examples=2000, deadline=None)
@given(HEADER)
def test_any_authorization_header_is_refused_or_anonymous(header):
    try:
        grant = AUTH.http_grant(header)
    except Unauthorized as refused:
        assert refused.message in FIXED_MESSAGES  # never built from what was sent
        return
    pytest.fail(f"granted {grant!r}")  # no random header is a key or a signed token


FIXED_MESSAGES = {
    "the Authorization header must be 'Bearer <API key or token>'",
    f"the credential is longer than {MAX_TOKEN_LENGTH} characters",
    "not a known API key or a well-formed token",
    "token algorithm not accepted; use one of HS256",
    "the token is malformed",
    "the token's signature does not verify",
    "the token is not valid",
}


@settings(max_examples=2000, deadline=None)
@given(st.one_of(TEXT, TOKENISH), st.one_of(st.none(), HEADER))
def test_any_query_token_is_refused(query_token, header):
    if not query_token:
        return  # an empty token counts as none: then the header decides
    with pytest.raises(Unauthorized):
        AUTH.ws_grant(query_token, header)


@st.composite
def tampered_tokens(draw: st.DrawFn) -> str:
    """A valid token with one character of it changed."""
    valid = token("alice", ["chat.*"], ["chat.*"])
    index = draw(st.integers(0, len(valid) - 1))
    replacement = draw(st.sampled_from("ABCxyz019-_."))
    if valid[index] == replacement:
        replacement = "Q" if replacement != "Q" else "R"
    return valid[:index] + replacement + valid[index + 1:]


@settings(max_examples=1500, deadline=None)
@given(tampered_tokens())
def test_a_token_changed_anywhere_is_refused(tampered):
    try:
        grant = AUTH.grant(tampered)
    except Unauthorized:
        return
    # base64url can spell one value two ways in its last character: the same claims
    assert jwt.decode(tampered, SECRET, algorithms=["HS256"])["sub"] == grant.sub == "alice"


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.sampled_from(["sub", "exp", "squall", "nbf", "iat", "aud", "x"]),
                       st.recursive(st.none() | st.booleans() | st.integers() | TEXT,
                                    lambda inner: st.lists(inner, max_size=3)
                                    | st.dictionaries(TEXT, inner, max_size=3), max_leaves=8)))
def test_any_signed_claims_give_a_grant_or_unauthorized(claims):
    signed = jwt.encode(claims, SECRET, algorithm="HS256")
    try:
        grant = AUTH.grant(signed)
    except Unauthorized:
        return
    assert isinstance(claims["sub"], str) and isinstance(claims["exp"], int)
    assert grant.sub == claims["sub"] and grant.expires_at == claims["exp"]


ORIGIN = st.one_of(TEXT, st.builds("{}://{}".format, st.sampled_from(["http", "https", "x"]),
                                   TEXT))


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.integers(min_value=4_000_000_000),
                 st.builds(pow, st.just(10), st.integers(10, 2000))))  # past any float
def test_any_future_exp_gives_a_finite_expiry(exp):
    grant = AUTH.grant(jwt.encode({"sub": "a", "exp": exp}, SECRET, algorithm="HS256"))
    assert grant.expires_at is not None and math.isfinite(grant.expires_at)
    assert grant.expires_at >= 4_000_000_000


@settings(max_examples=2000, deadline=None)
@given(ORIGIN, TEXT)
def test_any_origin_is_answered(origin, host):
    allowed = AUTH.origin_allowed(origin, host)
    normal = origin.strip().rstrip("/").lower()
    listed = normal == "https://app.example.com"
    same = bool(host.strip()) and normal.endswith("://" + host.strip().lower())
    assert allowed is (listed or same)


@settings(max_examples=2000, deadline=None)
@given(st.text(st.characters(codec="ascii", exclude_characters="&"), min_size=1, max_size=40),
       TEXT)
def test_logged_uris_never_hold_the_token(value, rest):
    masked = redacted_uri(f"/v1/ws?a={rest[:5]}&token={value}&b=1")
    query = parse_qsl(masked.partition("?")[2], keep_blank_values=True)
    assert [found for name, found in query if name == "token"] == ["***"]


# -- against a real server -------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--api-keys", API_KEY, "--jwt-secret", SECRET, "--public-topics",
                       "news.>", "--publish-rate", "0", "--max-connections-per-ip", "0",
                       "--frame-rate", "0") as running:
        yield running


LATIN1_HEADER = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF,
                                      exclude_characters="\x7f"), max_size=200)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(LATIN1_HEADER, st.builds(lambda rest: "Bearer " + rest, TOKENISH)))
def test_server_answers_any_authorization_with_401(server, header):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request("POST", "/v1/topics/news.a/events", body=b"1",
                           headers={"Content-Type": "application/json",
                                    "Authorization": header})
        response = connection.getresponse()
        body = json.loads(response.read())
    finally:
        connection.close()
    assert response.status in (400, 401), (header, body)  # 400: a header http.client sent
    assert body["error"]["code"] in ("unauthorized", "invalid_body")


URL_TOKEN = st.text(st.characters(codec="ascii", categories=["L", "N", "P", "S"],
                                  exclude_characters="#&+%"), min_size=1, max_size=120)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(URL_TOKEN, TOKENISH.filter(bool)), st.one_of(st.none(), LATIN1_HEADER))
def test_server_closes_any_query_token_with_4001(server, query_token, origin):
    headers = {} if origin is None else {"Origin": origin}
    url = f"ws://127.0.0.1:{server.port}/v1/ws?topic=news.a&token={query_token}"
    try:
        with connect(url, additional_headers=headers, open_timeout=10) as client:
            client.recv(timeout=10)
            pytest.fail("a random token was let in")
    except ConnectionClosed as closed:
        assert closed.rcvd is not None and closed.rcvd.code in (4001, 4003)
        assert closed.rcvd.code == 4001 or origin is not None
    except InvalidStatus as refused:  # a URL the HTTP layer refuses before any handler
        assert refused.response.status_code == 400


LATIN1_ORIGIN = st.one_of(LATIN1_HEADER, st.builds(
    "{}://{}".format, st.sampled_from(["http", "https"]), LATIN1_HEADER))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(LATIN1_ORIGIN)
def test_server_answers_any_origin_without_cors_or_error(server, origin):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request("GET", "/v1/topics", headers={"Origin": origin})
        response = connection.getresponse()
        response.read()
    finally:
        connection.close()
    assert response.status == 200
    same = origin.strip().rstrip("/").lower() == f"http://127.0.0.1:{server.port}"
    assert (response.getheader("Access-Control-Allow-Origin") is not None) is same


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(LATIN1_ORIGIN)
def test_server_closes_any_foreign_origin_with_4003(server, origin):
    url = f"ws://127.0.0.1:{server.port}/v1/ws?topic=news.a"
    try:
        with connect(url, additional_headers={"Origin": origin}, open_timeout=10) as client:
            frame = json.loads(client.recv(timeout=10))
    except ConnectionClosed as closed:
        assert closed.rcvd is not None and closed.rcvd.code == 4003
        return
    except InvalidStatus as refused:  # an Origin that is no URL at all
        assert refused.response.status_code == 400
        with pytest.raises(ValueError):
            urlsplit(origin)
        return
    assert frame["type"] == "subscribed"  # only the server's own origin gets in
    assert origin.strip().rstrip("/").lower() == f"http://127.0.0.1:{server.port}"


def test_a_valid_token_gets_in(server):
    """The fuzz tests above could not pass against a server that refused everyone."""
    url = f"ws://127.0.0.1:{server.port}/v1/ws?token={token('a', ['news.*'])}&topic=news.a"
    with connect(url, open_timeout=10) as client:
        assert json.loads(client.recv(timeout=10))["type"] == "subscribed"
