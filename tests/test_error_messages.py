"""Error messages that say what was wrong and what to send instead."""

from __future__ import annotations

import json

import msgpack
import pytest

pytestmark = pytest.mark.gen_test(timeout=20)


async def fetch(http_client, base_url, path, **options):
    return await http_client.fetch(base_url + path, raise_error=False,
                                   allow_nonstandard_methods=True, **options)


def error_of(response) -> dict:
    assert response.headers["Content-Type"] == "application/json", response.body
    error: dict = json.loads(response.body)["error"]
    return error


@pytest.mark.parametrize(("method", "path", "allow", "message"), [
    ("DELETE", "/v1/topics/orders.eu/events", "GET, POST, OPTIONS",
     "DELETE is not allowed on /v1/topics/orders.eu/events; this path takes GET, POST and "
     "OPTIONS"),
    ("PUT", "/v1/events", "POST, OPTIONS",
     "PUT is not allowed on /v1/events; this path takes POST and OPTIONS"),
    ("POST", "/healthz", "GET, OPTIONS",
     "POST is not allowed on /healthz; this path takes GET and OPTIONS"),
    ("PATCH", "/v1/topics", "GET, OPTIONS",
     "PATCH is not allowed on /v1/topics; this path takes GET and OPTIONS"),
    ("POST", "/", "GET, HEAD", "POST is not allowed on /; this path takes GET and HEAD"),
    ("DELETE", "/static/squall.js", "GET, HEAD",
     "DELETE is not allowed on /static/squall.js; this path takes GET and HEAD"),
])
async def test_405_names_the_method_and_the_methods_the_path_takes(
        http_client, base_url, method, path, allow, message):
    body = b"{}" if method in ("POST", "PUT", "PATCH") else None
    response = await fetch(http_client, base_url, path, method=method, body=body)
    assert response.code == 405
    assert response.headers["Allow"] == allow
    assert error_of(response) == {"code": "method_not_allowed", "message": message}


async def test_a_missing_static_file_is_a_json_404(http_client, base_url):
    response = await fetch(http_client, base_url, "/static/nothing.js")
    assert response.code == 404
    assert error_of(response)["code"] == "not_found"


EVENT = ('the event\'s data as JSON, such as {"text": "hi"}, with Content-Type: '
         "application/json (or msgpack with Content-Type: application/msgpack)")
BATCH = '{"events": [{"topic": "orders.eu", "data": {"text": "hi"}}]} as JSON (or msgpack)'


@pytest.mark.parametrize(("path", "body", "headers", "message"), [
    ("/v1/topics/a/events", b"", {}, f"the body is empty; send {EVENT}"),
    ("/v1/topics/a/events", b"  \n", {}, f"the body is empty; send {EVENT}"),
    ("/v1/topics/a/events", b"", {"Content-Type": "application/msgpack"},
     f"the body is empty; send {EVENT}"),
    ("/v1/topics/a/events", b"{bad", {},
     "malformed JSON: unexpected character, expected a string key at line 1 column 2; "
     f"send {EVENT}"),
    ("/v1/topics/a/events", b"status=paid", {"Content-Type": "application/x-www-form-urlencoded"},
     f"malformed JSON: unexpected character, expected a JSON value at line 1 column 1; "
     f"send {EVENT}"),
    ("/v1/events", b"", {}, f"the body is empty; send {BATCH}"),
    ("/v1/events", b"[1,", {},
     f"malformed JSON: unexpected end of data at line 1 column 4; send {BATCH}"),
])
async def test_a_bad_body_says_what_to_send_instead(http_client, base_url, path, body, headers,
                                                    message):
    response = await fetch(http_client, base_url, path, method="POST", body=body,
                           headers=headers)
    assert response.code == 400
    assert error_of(response) == {"code": "invalid_body", "message": message}


async def test_a_msgpack_body_of_one_space_is_the_number_32(http_client, base_url):
    response = await fetch(http_client, base_url, "/v1/topics/a/events", method="POST",
                           body=msgpack.packb(32), headers={"Content-Type": "application/msgpack"})
    assert response.code == 202, response.body


async def test_an_unsupported_content_type_is_named(http_client, base_url):
    response = await fetch(http_client, base_url, "/v1/topics/a/events", method="POST",
                           body=b"hi", headers={"Content-Type": "text/plain"})
    assert response.code == 415
    assert error_of(response) == {
        "code": "unsupported_media_type",
        "message": "Content-Type 'text/plain' is not supported; send application/json or "
                   "application/msgpack"}
