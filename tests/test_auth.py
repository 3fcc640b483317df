"""Auth logic: pattern containment, credentials to grants, origins, settings checks."""

from __future__ import annotations

import hashlib
import hmac
import time

import jwt
import pytest

from config.settings import SettingsError, load_settings
from server.auth import (
    OPEN,
    Auth,
    Forbidden,
    Grant,
    Unauthorized,
    bearer,
    covers,
    issue_token,
    load_public_key,
    redacted_uri,
)
from tests.auth_support import (
    API_KEY,
    EC_P256,
    EC_P384,
    OTHER_API_KEY,
    OTHER_SECRET,
    RSA,
    SECRET,
    make_key_pair,
    token,
    unsigned_token,
)

# -- pattern containment ----------------------------------------------------------------

COVERED = [
    ("orders.*", "orders.*"), ("orders.>", "orders.*"), ("orders.>", "orders.eu"),
    ("orders.>", "orders.>"), ("orders.>", "orders.*.x"), ("orders.>", "orders.a.>"),
    (">", ">"), (">", "a"), (">", "*.*"), (">", "a.>"), ("*", "*"), ("*", "a"),
    ("*.b", "a.b"), ("*.>", "*.*"), ("*.>", "a.>"), ("a.*.c", "a.*.c"), ("a.*.c", "a.b.c"),
    ("a", "a"), ("a.b", "a.b"),
]
NOT_COVERED = [
    ("orders.eu", "orders.*"), ("orders.*", "orders.>"), ("orders.*", "orders"),
    ("orders.>", "orders"), ("orders.*", "orders.eu.x"), ("*", ">"), ("*.>", ">"),
    ("a.>", ">"), ("a.>", "*.b"), ("a", "*"), ("a", "a.b"), ("a.b", "a"), ("a.*", "b.c"),
    ("*.b", "*.*"), ("*", "a.b"), ("a.b.>", "a.>"), ("a.*.c", "a.*.*"),
]


@pytest.mark.parametrize(("granted", "requested"), COVERED)
def test_covered_patterns(granted, requested):
    assert covers(granted, requested)


@pytest.mark.parametrize(("granted", "requested"), NOT_COVERED)
def test_patterns_not_covered(granted, requested):
    assert not covers(granted, requested)


def test_grant_checks_raise_forbidden_with_the_topic():
    grant = Grant(sub="alice", subscribe=("chat.*",), publish=("chat.room1",))
    grant.check_subscribe("chat.lobby")
    grant.check_publish("chat.room1")
    with pytest.raises(Forbidden, match=r"subscribe to 'chat\.>'") as refused:
        grant.check_subscribe("chat.>")
    assert refused.value.code == "forbidden" and refused.value.status == 403
    with pytest.raises(Forbidden, match=r"publish to 'chat\.room2'"):
        grant.check_publish("chat.room2")


# -- credentials to grants ------------------------------------------------------------


@pytest.fixture
def auth() -> Auth:
    return Auth(api_keys=(OTHER_API_KEY, API_KEY), jwt_secret=SECRET,
                public_topics=("news.>",))


def test_auth_off_allows_everything_and_ignores_credentials():
    off = Auth()
    assert not off.enabled
    assert off.grant(None) is OPEN
    assert off.grant("anything at all") is OPEN
    assert off.http_grant("Basic abc") is OPEN


def test_no_credential_is_anonymous(auth):
    grant = auth.grant(None)
    assert grant.sub is None and grant.publish == ()
    assert grant.may_subscribe("news.eu") and grant.may_subscribe("news.*")
    assert not grant.may_subscribe("news") and not grant.may_subscribe(">")
    assert not grant.may_publish("news.eu")


def test_api_keys_grant_everything_and_are_told_apart(auth):
    first, second = auth.grant(OTHER_API_KEY), auth.grant(API_KEY)
    for grant in (first, second):
        assert grant.may_publish("any.topic") and grant.may_subscribe(">")
    assert (first.limit_key, second.limit_key) == ("key:0", "key:1")
    assert API_KEY not in repr(second)


@pytest.mark.parametrize("credential", [API_KEY[:-1], API_KEY + "0", API_KEY.upper(), " ", "x"])
def test_near_misses_of_a_key_are_refused(auth, credential):
    with pytest.raises(Unauthorized):
        auth.grant(credential)


def test_api_keys_are_not_taken_from_the_query(auth):
    with pytest.raises(Unauthorized):
        auth.ws_grant(API_KEY, None)
    assert auth.ws_grant(None, f"Bearer {API_KEY}").may_publish("x")


def test_token_claims_become_the_grant(auth):
    grant = auth.grant(token("alice", ["chat.*"], ["chat.room1"], ttl=60))
    assert grant.sub == "alice" and grant.limit_key == "sub:alice"
    assert grant.subscribe == ("chat.*", "news.>")  # public topics are everyone's
    assert grant.publish == ("chat.room1",)
    assert grant.expires_at is not None and 0 < grant.expires_at - time.time() <= 60


def test_query_token_wins_over_the_header(auth):
    grant = auth.ws_grant(token("bob"), f"Bearer {token('carol')}")
    assert grant.sub == "bob"
    assert auth.ws_grant("", f"Bearer {token('carol')}").sub == "carol"


BAD_TOKENS = {
    "alg none": unsigned_token,
    "wrong secret": lambda: token(key=OTHER_SECRET),
    "expired": lambda: token(ttl=-5),
    "not yet valid": lambda: token(nbf=int(time.time()) + 600),
    "no exp": lambda: token(exp=None),
    "no sub": lambda: token(sub=None),
    "sub not text": lambda: token(42),
    "claim not an object": lambda: token(squall=["chat.*"]),
    "patterns not a list": lambda: token(squall={"subscribe": "chat.*"}),
    "bad pattern": lambda: token(["chat.>.x"]),
    "HS384": lambda: token(algorithm="HS384"),
    "audience": lambda: token(aud="someone-else"),
    "malformed": lambda: "not.a.token",
    "garbage": lambda: "eyJhbGciOiJIUzI1NiJ9.%%%.xyz",
    "too long": lambda: "a" * 9000,
    "tampered": lambda: _tampered(token(["chat.*"])),
}


def _tampered(valid: str) -> str:
    header, _, signature = valid.split(".")
    body = jwt.utils.base64url_encode(
        b'{"sub":"alice","exp":9999999999,"squall":{"subscribe":[">"],"publish":[">"]}}')
    return f"{header}.{body.decode()}.{signature}"


@pytest.mark.parametrize("kind", BAD_TOKENS)
def test_bad_tokens_are_refused(auth, kind):
    credential = BAD_TOKENS[kind]()
    with pytest.raises(Unauthorized) as refused:
        auth.grant(credential)
    assert refused.value.status == 401
    assert credential not in refused.value.message and SECRET not in refused.value.message


def test_refusals_say_what_is_wrong(auth):
    def reason(credential: str) -> str:
        with pytest.raises(Unauthorized) as refused:
            auth.grant(credential)
        return refused.value.message

    assert "expired" in reason(token(ttl=-5))
    assert "signature" in reason(token(key=OTHER_SECRET))
    assert "'exp'" in reason(token(exp=None))
    assert "algorithm" in reason(unsigned_token())


def test_tokens_need_a_jwt_key():
    keys_only = Auth(api_keys=(API_KEY,))
    with pytest.raises(Unauthorized, match="not a known API key"):
        keys_only.grant(token())


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer   ", "Token abc",
                                    "", "bearer"])
def test_authorization_must_be_bearer(header):
    with pytest.raises(Unauthorized, match="Bearer"):
        bearer(header)


def test_bearer_scheme_is_case_insensitive():
    assert bearer(None) is None
    assert bearer("bearer abc") == "abc" and bearer("  BEARER   abc ") == "abc"


# -- public keys --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    return {name: make_key_pair(folder, name, *options)
            for name, options in (("rsa", RSA), ("rsa2", RSA), ("ec", EC_P256),
                                  ("ec2", EC_P256), ("p384", EC_P384))}


def test_rs256_and_es256_with_the_public_key(pairs):
    for name, algorithm in (("rsa", "RS256"), ("ec", "ES256")):
        key, found = load_public_key(pairs[name].public)
        assert found == algorithm
        auth = Auth(public_key=key, public_algorithm=found)
        signed = token("bob", ["a.*"], key=pairs[name].private, algorithm=algorithm)
        assert auth.grant(signed).may_subscribe("a.b")
        other = "rsa2" if name == "rsa" else "ec2"
        with pytest.raises(Unauthorized):
            auth.grant(token(key=pairs[other].private, algorithm=algorithm))


def test_the_public_key_is_never_an_hmac_secret(pairs):
    key, algorithm = load_public_key(pairs["rsa"].public)
    auth = Auth(public_key=key, public_algorithm=algorithm)
    # algorithm confusion: an HS256 token whose HMAC key is the public key's PEM text
    # (PyJWT refuses to sign so, hence by hand)
    signing_input = b".".join([jwt.utils.base64url_encode(b'{"alg":"HS256","typ":"JWT"}'),
                               jwt.utils.base64url_encode(b'{"sub":"eve","exp":9999999999}')])
    signature = hmac.new(pairs["rsa"].public, signing_input, hashlib.sha256).digest()
    confused = (signing_input + b"." + jwt.utils.base64url_encode(signature)).decode()
    with pytest.raises(Unauthorized, match="algorithm"):
        auth.grant(confused)
    with pytest.raises(Unauthorized, match="algorithm"):  # an RS256 key, an ES256 token
        auth.grant(token(key=pairs["ec"].private, algorithm="ES256"))


def test_load_public_key_refuses_what_it_cannot_use(pairs):
    with pytest.raises(ValueError, match="private key"):
        load_public_key(pairs["rsa"].private)
    with pytest.raises(ValueError, match="P-256"):
        load_public_key(pairs["p384"].public)
    with pytest.raises(ValueError, match="not an RSA or EC public key"):
        load_public_key(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")


def test_settings_check_the_public_key_file(pairs, tmp_path):
    settings = load_settings(["--jwt-public-key", str(pairs["ec"].public_path)], environ={})
    assert Auth.from_settings(settings).enabled
    cases = {
        str(tmp_path / "missing.pem"): "cannot read",
        str(pairs["rsa"].private_path): "private key",
        str(pairs["p384"].public_path): "P-256",
        str(tmp_path): "cannot read",
    }
    for path, reason in cases.items():
        with pytest.raises(SettingsError, match=reason) as bad:
            load_settings(["--jwt-public-key", path], environ={})
        assert str(bad.value).startswith("setting jwt_public_key") and "\n" not in str(bad.value)


# -- settings --------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "named"), [
    (["--public-topics", "news.>,bad..topic"], "public_topics"),
    (["--public-topics", "a.>.b"], "public_topics"),
    (["--allowed-origins", "app.example.com"], "allowed_origins"),
    (["--allowed-origins", "https://app.example.com/path"], "allowed_origins"),
    (["--frame-rate", "-1"], "frame_rate"),
    (["--max-connections-per-ip", "x"], "max_connections_per_ip"),
    (["--publish-burst", "0"], "publish_burst"),
])
def test_bad_auth_and_limit_settings_name_the_setting(flags, named):
    with pytest.raises(SettingsError) as bad:
        load_settings(flags, environ={})
    assert named in str(bad.value) and "\n" not in str(bad.value)


def test_auth_settings_from_the_environment():
    settings = load_settings([], environ={
        "SQUALL_API_KEYS": f"{API_KEY},{OTHER_API_KEY}", "SQUALL_JWT_SECRET": SECRET,
        "SQUALL_PUBLIC_TOPICS": "news.>,status", "SQUALL_ALLOWED_ORIGINS": "*"})
    auth = Auth.from_settings(settings)
    assert auth.grant(API_KEY).may_publish("x")
    assert auth.grant(None).may_subscribe("status")
    assert auth.origin_allowed("https://anywhere.example", "squall.example")


# -- origins ---------------------------------------------------------------------------

ORIGINS = [
    # allowed_origins, origin, host, allowed
    ((), "http://127.0.0.1:8888", "127.0.0.1:8888", True),
    ((), "http://LOCALHOST:8888/", "localhost:8888", True),
    ((), "http://evil.example", "127.0.0.1:8888", False),
    ((), "http://127.0.0.1:9999", "127.0.0.1:8888", False),
    ((), "null", "127.0.0.1:8888", False),
    ((), "", "127.0.0.1:8888", False),
    (("https://app.example.com",), "https://app.example.com", "squall.example", True),
    (("https://app.example.com",), "https://APP.example.com/", "squall.example", True),
    (("https://app.example.com",), "http://app.example.com", "squall.example", False),
    (("https://app.example.com",), "https://app.example.com.evil", "squall.example", False),
    (("https://app.example.com",), "https://squall.example", "squall.example", True),
    (("*",), "http://evil.example", "squall.example", True),
    (("*",), "null", "squall.example", True),
]


@pytest.mark.parametrize(("allowed", "origin", "host", "expected"), ORIGINS)
def test_origins(allowed, origin, host, expected):
    assert Auth(allowed_origins=allowed).origin_allowed(origin, host) is expected


# -- log hygiene -----------------------------------------------------------------------


@pytest.mark.parametrize(("uri", "expected"), [
    ("/v1/ws?token=abc.def.ghi&topic=a.b", "/v1/ws?token=***&topic=a.b"),
    ("/v1/ws?topic=a.*&token=abc", "/v1/ws?topic=a.*&token=***"),
    ("/v1/ws?%74oken=abc", "/v1/ws?token=***"),
    ("/v1/ws?token=abc&token=abc2", "/v1/ws?token=***&token=***"),
    ("/v1/ws?topic=a&x=abc%", "/v1/ws?topic=a&x=abc%"),
    ("/v1/topics", "/v1/topics"),
    ("/v1/topics/a/events?api_key=k1&limit=2", "/v1/topics/a/events?api_key=***&limit=2"),
    ("/v1/ws?access_token=t&key=k&X-Api-Key=k&Password=p&since=a-1",
     "/v1/ws?access_token=***&key=***&X-Api-Key=***&Password=***&since=a-1"),
    ("/v1/ws?client_secret=s&jwt=j&session=s&sig=x",
     "/v1/ws?client_secret=***&jwt=***&session=***&sig=***"),
])
def test_credentials_are_masked_in_logged_uris(uri, expected):
    assert redacted_uri(uri) == expected


def test_issue_token_round_trip():
    issued = issue_token(SECRET, "alice", ["chat.*"], ["chat.room1"], ttl=120, now=1000.0)
    claims = jwt.decode(issued, SECRET, algorithms=["HS256"], options={"verify_exp": False})
    assert claims == {"sub": "alice", "iat": 1000, "exp": 1120,
                      "squall": {"subscribe": ["chat.*"], "publish": ["chat.room1"]}}
