"""Topic names, patterns and the router, as tables: what matches, what does not."""

from __future__ import annotations

import pytest

from server.router import Router
from server.topics import InvalidTopic, matches, validate_pattern, validate_topic

MATCHES = [
    ("orders", "orders"),
    ("orders.eu", "orders.eu"),
    ("orders.*", "orders.eu"),
    ("orders.*.created", "orders.eu.created"),
    ("*.eu", "orders.eu"),
    ("*", "orders"),
    ("orders.>", "orders.eu"),
    ("orders.>", "orders.eu.created.today"),
    (">", "orders"),
    (">", "a.b.c"),
    ("*.*.>", "a.b.c"),
    ("user:42.inbox", "user:42.inbox"),
    ("a-b_c@d.*", "a-b_c@d.x"),
]

MISSES = [
    ("orders", "orders.eu"),
    ("orders.eu", "orders"),
    ("orders.*", "orders"),
    ("orders.*", "orders.eu.created"),
    ("orders.*.created", "orders.eu.deleted"),
    ("orders.>", "orders"),
    ("*.eu", "orders.us"),
    ("*", "a.b"),
    ("*.*.>", "a.b"),
    ("Orders", "orders"),
]


@pytest.mark.parametrize(("pattern", "topic"), MATCHES)
def test_matches(pattern, topic):
    assert matches(pattern, topic)
    router: Router[str] = Router()
    router.add(pattern, "sub")
    router.add("unrelated.topic", "other")
    assert list(router.match(topic)) == ["sub"]


@pytest.mark.parametrize(("pattern", "topic"), MISSES)
def test_does_not_match(pattern, topic):
    assert not matches(pattern, topic)
    router: Router[str] = Router()
    router.add(pattern, "sub")
    assert list(router.match(topic)) == []


VALID_TOPICS = ["a", "orders.eu.created", "user:42.inbox", "A-Z_0-9@x", "a" * 255]
INVALID_TOPICS = [
    ("", "empty"), ("a..b", "empty segment"), (".a", "empty segment"),
    ("a.", "empty segment"), ("a b", "invalid segment"), ("a/b", "invalid segment"),
    ("é", "invalid segment"), ("a" * 256, "limit"), ("a.*", "wildcard"), ("a.>", "wildcard"),
    ("a*", "invalid segment"), (42, "string"), (None, "string"), ("a\n", "invalid segment"),
]
VALID_PATTERNS = ["*", ">", "a.*", "a.>", "*.b.>", "a.*.c"]
INVALID_PATTERNS = [("a.>.b", "before its last"), ("a.**", "invalid segment"),
                    ("a.b>", "invalid segment"), ("a..*", "empty segment")]


@pytest.mark.parametrize("topic", VALID_TOPICS)
def test_valid_topics(topic):
    assert validate_topic(topic) == topic
    assert validate_pattern(topic) == topic


@pytest.mark.parametrize(("topic", "reason"), INVALID_TOPICS)
def test_invalid_topics(topic, reason):
    with pytest.raises(InvalidTopic, match=reason):
        validate_topic(topic)


@pytest.mark.parametrize("pattern", VALID_PATTERNS)
def test_valid_patterns(pattern):
    assert validate_pattern(pattern) == pattern


@pytest.mark.parametrize(("pattern", "reason"), INVALID_PATTERNS)
def test_invalid_patterns(pattern, reason):
    with pytest.raises(InvalidTopic, match=reason):
        validate_pattern(pattern)


def test_topic_length_is_configurable():
    with pytest.raises(InvalidTopic, match="limit is 10"):
        validate_topic("a" * 11, max_length=10)


def test_first_and_last_edges():
    router: Router[str] = Router()
    assert router.add("a.*", "one") is True
    assert router.add("a.*", "two") is False
    assert router.add("a.*", "two") is False
    assert router.remove("a.*", "one") is False
    assert router.remove("a.*", "nobody") is False
    assert router.remove("a.*", "two") is True
    assert router.remove("a.*", "two") is False
    assert list(router.match("a.b")) == []
    assert dict(router.names()) == {}


def test_a_subscriber_matched_twice_is_returned_once():
    router: Router[str] = Router()
    for name in ("a.b", "a.*", "a.>", "*.b", ">"):
        router.add(name, "sub")
    router.add("a.*", "other")
    assert sorted(router.match("a.b")) == ["other", "sub"]


def test_removing_a_pattern_prunes_only_its_branch():
    router: Router[str] = Router()
    router.add("a.*.c", "x")
    router.add("a.*", "y")
    router.remove("a.*.c", "x")
    assert list(router.match("a.b")) == ["y"]
    assert list(router.match("a.b.c")) == []
    router.remove("a.*", "y")
