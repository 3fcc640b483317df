"""Settings layers, validation messages and the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from config.settings import FIELDS, GROUPS, Settings, SettingsError, load_settings
from config.validation import BROKER_SCHEMES
from server import __version__
from server.broker.base import BrokerOptions, create_broker

ROOT = Path(__file__).resolve().parent.parent


def test_defaults():
    settings = load_settings([], environ={})
    assert settings == Settings()
    assert (settings.host, settings.port, settings.broker) == ("127.0.0.1", 8888, "memory://")


def test_layers_file_then_env_then_flags(tmp_path):
    config = tmp_path / "squall.toml"
    config.write_text('port = 9001\nmax_event_bytes = 1000\nhost = "0.0.0.0"\n'
                      'public_topics = ["news.*", "status"]\n')
    environ = {"SQUALL_PORT": "9002", "SQUALL_MAX_EVENT_BYTES": "2000"}
    settings = load_settings(["--config", str(config), "--port", "9003"], environ=environ)
    assert settings.port == 9003
    assert settings.max_event_bytes == 2000
    assert settings.host == "0.0.0.0"
    assert settings.public_topics == ("news.*", "status")


def test_config_file_from_environment(tmp_path):
    config = tmp_path / "squall.toml"
    config.write_text("history_size = 7\n")
    assert load_settings([], environ={"SQUALL_CONFIG": str(config)}).history_size == 7


def test_lists_from_env_are_comma_separated():
    settings = load_settings([], environ={"SQUALL_API_KEYS": "k1, k2,,"})
    assert settings.api_keys == ("k1", "k2")


# Every bad value, from every layer: the setting, the value, where it came from and
# what is allowed, on one line.
@pytest.mark.parametrize(("argv", "environ", "toml", "message"), [
    (["--port", "abc"], {}, "",
     "setting port = 'abc' (from --port): must be a whole number from 0 to 65535"),
    (["--port", "99999"], {}, "",
     "setting port = 99999 (from --port): must be a whole number from 0 to 65535"),
    ([], {"SQUALL_PORT": "99999"}, "",
     "setting port = 99999 (from SQUALL_PORT): must be a whole number from 0 to 65535"),
    ([], {}, "port = 99999",
     "setting port = 99999 (from port in {toml}): must be a whole number from 0 to 65535"),
    ([], {}, 'port = "abc"',
     "setting port = 'abc' (from port in {toml}): must be a whole number from 0 to 65535"),
    ([], {}, "port = 80.5",
     "setting port = 80.5 (from port in {toml}): must be a whole number from 0 to 65535"),
    ([], {"SQUALL_MAX_EVENT_BYTES": "0"}, "",
     "setting max_event_bytes = 0 (from SQUALL_MAX_EVENT_BYTES): must be a whole number "
     "of at least 1"),
    ([], {"SQUALL_HISTORY_TTL": "soon"}, "",
     "setting history_ttl = 'soon' (from SQUALL_HISTORY_TTL): must be a number of at least 0"),
    ([], {"SQUALL_ACCESS_LOG": "maybe"}, "",
     "setting access_log = 'maybe' (from SQUALL_ACCESS_LOG): must be true or false"),
    (["--log-level", "loud"], {}, "",
     "setting log_level = 'loud' (from --log-level): must be one of debug, info, warning, "
     "error, critical"),
    ([], {}, 'log_format = "xml"',
     "setting log_format = 'xml' (from log_format in {toml}): must be one of text, json"),
    (["--broker", "http://x"], {}, "",
     "setting broker = 'http://x' (from --broker): must be memory://, or a Redis URL: "
     "redis://HOST:6379/0, rediss://HOST:6379/0 (TLS) or unix:///PATH/redis.sock, or "
     "redis+cluster://HOST:7000,HOST:7001 for Redis Cluster"),
    (["--broker", "nowhere"], {}, "",
     "setting broker = 'nowhere' (from --broker): must be memory://, or a Redis URL: "
     "redis://HOST:6379/0, rediss://HOST:6379/0 (TLS) or unix:///PATH/redis.sock, or "
     "redis+cluster://HOST:7000,HOST:7001 for Redis Cluster"),
    (["--broker", "redis://h:abc/0"], {}, "",
     "setting broker = 'redis://h:abc/0' (from --broker): has a port that is not a number "
     "from 0 to 65535; e.g. redis://HOST:6379/0"),
    ([], {"SQUALL_BROKER": "redis://h/zero"}, "",
     "setting broker = 'redis://h/zero' (from SQUALL_BROKER): must end in a database number, "
     "as in redis://HOST:6379/0"),
    (["--broker", "redis://h/\u00b2"], {}, "",
     "setting broker = 'redis://h/\u00b2' (from --broker): must end in a database number, "
     "as in redis://HOST:6379/0"),
    (["--workers", "2"], {}, "",
     "setting workers = 2 (from --workers): more than 1 needs a shared broker, and "
     "broker = 'memory://' (default): use --broker redis://HOST:6379/0, or --workers 1"),
    (["--ping-interval", "5", "--ping-timeout", "10"], {}, "",
     "setting ping_timeout = 10 (from --ping-timeout): must not exceed ping_interval = 5 "
     "(from --ping-interval)"),
    ([], {"SQUALL_SEND_QUEUE_BYTES": "2000"}, "",
     "setting send_queue_bytes = 2000 (from SQUALL_SEND_QUEUE_BYTES): must hold one largest "
     "event: at least max_event_bytes + 16384 = 81920, with max_event_bytes = 65536 "
     "(default)"),
    (["--jwt-secret", "s3cret", "--api-keys", "k1", "--public-topics", "a..b"], {}, "",
     "setting public_topics = ['a..b'] (from --public-topics): must hold topic patterns: "
     "topic 'a..b' has an empty segment"),
    ([], {}, "allowed_origins = ['app.example.com']",
     "setting allowed_origins = ['app.example.com'] (from allowed_origins in {toml}): must "
     "hold * or origins such as https://app.example.com (no path), not 'app.example.com'"),
    ([], {}, 'hooks = ["my app"]',
     "setting hooks = ['my app'] (from hooks in {toml}): must list module names such as "
     "'myapp.squall_hooks', not 'my app'"),
    ([], {}, '[[webhooks]]\nurl = "https://backend.example/squall"',
     "setting webhooks[0] (from webhooks in {toml}) lacks secret and signals: a [[webhooks]] "
     "table needs url, secret and signals"),
    ([], {}, '[[webhooks]]\nurl = "https://b.example"\nsecret = "s"\nsignals = "subscribed"',
     "setting webhooks[0] (from webhooks in {toml}): signals must be a list, such as "
     '["subscribed", "unsubscribed"]'),
    ([], {"SQUALL_HOOKS": "myapp.hooks"}, "",
     "setting hooks (from SQUALL_HOOKS) can only be set in the TOML file given with --config "
     "or SQUALL_CONFIG"),
    ([], {}, "api_keys = [1]",
     "setting api_keys (from api_keys in {toml}): must be a TOML list of strings, or "
     "comma-separated text"),
    ([], {}, "webhooks = 3",
     "setting webhooks = 3 (from webhooks in {toml}): must be [[webhooks]] tables"),
    ([], {"SQUALL_HISTORY_TTL": "inf"}, "",
     "setting history_ttl = 'inf' (from SQUALL_HISTORY_TTL): must be a number of at least 0"),
    ([], {}, "ping_interval = nan",
     "setting ping_interval = nan (from ping_interval in {toml}): must be a number of at "
     "least 0"),
    ([], {}, "prot = 1",
     "unknown setting 'prot' in config file {toml} (did you mean 'port'?); run.py --help "
     "lists them all"),
    (["--prot", "1"], {}, "",
     "unknown flag --prot (did you mean --port?); run.py --help lists every flag"),
    (["serve"], {}, "",
     "unexpected argument 'serve': run.py takes flags only; run.py --help lists every flag"),
    (["--port"], {}, "",
     "argument --port: expected one argument; run.py --help lists every flag"),
])
def test_bad_settings_are_one_line_naming_setting_value_source_and_rule(
        tmp_path, argv, environ, toml, message):
    config = tmp_path / "squall.toml"
    if toml:
        config.write_text(toml + "\n")
        argv = ["--config", str(config), *argv]
    with pytest.raises(SettingsError) as bad:
        load_settings(argv, environ=environ)
    assert str(bad.value) == message.format(toml=config)


def test_unknown_variables_are_named_and_ignored():
    environ = {"SQUALL_PROT": "1", "SQUALL_SERVICE_HOST": "10.0.0.1", "SQUALL_CONFIG": "",
               "SQUALL_PORT": "9000", "OTHER": "x"}
    assert load_settings([], environ=environ).port == 9000
    from config.settings import unknown_variables

    assert unknown_variables(environ) == [
        "warning: SQUALL_PROT names no setting and is ignored (did you mean 'SQUALL_PORT'?)",
        "warning: SQUALL_SERVICE_HOST names no setting and is ignored"]


ODD_VALUES = ["", " ", "x", "-1", "0", "1e999", "nan", "-inf", "99999999999999999999",
              "1,2", "true", [1], ["a"], {"a": 1}, 3.5, True, -7]


@pytest.mark.parametrize("name", [name for name in FIELDS if name != "webhooks"])
def test_any_value_of_any_setting_loads_or_is_one_line(tmp_path, name):
    """From the environment and from the file: a Settings, or one SettingsError line."""
    import tomllib

    config = tmp_path / "squall.toml"
    for value in ODD_VALUES:
        trials = [({}, {f"SQUALL_{name.upper()}": value})] if isinstance(value, str) else []
        document = f"{name} = {_toml(value)}\n"
        tomllib.loads(document)
        config.write_text(document)
        trials.append((["--config", str(config)], {}))
        for argv, environ in trials:
            try:
                load_settings(argv, environ=environ)
            except SettingsError as exc:  # also when another setting must agree with it
                assert "\n" not in str(exc) and name in str(exc), str(exc)


def _toml(value: object) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key} = {json.dumps(item)}" for key, item in value.items()) + "}"
    return json.dumps(value)


def test_a_bad_secret_is_named_but_never_shown():
    with pytest.raises(SettingsError) as bad:
        load_settings([], environ={"SQUALL_JWT_SECRET": "s3cret", "SQUALL_API_KEYS": "k1",
                                   "SQUALL_PORT": "x1"})
    assert "s3cret" not in str(bad.value)
    from config.settings import bad_value

    assert str(bad_value("jwt_secret", "s3cret", "--jwt-secret", "is wrong")) == (
        "setting jwt_secret (from --jwt-secret): is wrong")


def test_bad_config_file(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("port = \n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(["--config", str(config)], environ={})
    with pytest.raises(SettingsError, match="cannot read config file"):
        load_settings(["--config", str(tmp_path / "missing.toml")], environ={})


def test_secrets_never_shown():
    settings = load_settings(["--jwt-secret", "s3cret", "--api-keys", "k1"], environ={})
    shown = str(settings.redacted())
    assert "s3cret" not in shown and "k1" not in shown


def test_every_setting_has_a_group_and_a_help():
    for name, spec in FIELDS.items():
        assert spec.metadata["group"] in GROUPS, (
            f"setting {name} has no group: pass group=... to _setting in config/settings.py "
            f"(one of {', '.join(GROUPS)})")
        assert spec.metadata["help"], name


@pytest.mark.parametrize("scheme", BROKER_SCHEMES)
def test_every_broker_scheme_the_settings_accept_makes_a_broker(scheme):
    url = {"memory": "memory://", "unix": "unix:///tmp/redis.sock"}.get(
        scheme, f"{scheme}://127.0.0.1:6379/0")
    load_settings(["--broker", url], environ={})
    assert create_broker(url, BrokerOptions()) is not None


# -- the command line, as a user runs it ------------------------------------------------


def run_py(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True,
                          check=False, text=True, timeout=30, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", **(env or {})})


def test_help_lists_every_flag_the_choices_and_the_token_command():
    result = run_py("--help")
    assert result.returncode == 0
    for name, spec in FIELDS.items():
        if spec.metadata["cli"]:
            assert "--" + name.replace("_", "-") in result.stdout
    for text in ("--config", "--version", "SQUALL_CONFIG", "token", "run.py token --help",
                 "debug, info, warning, error or critical", "text or json",
                 "In the TOML file only: hooks, webhooks"):
        assert text in result.stdout, text


def test_version():
    result = run_py("--version")
    assert (result.returncode, result.stdout) == (0, f"squall {__version__}\n")


@pytest.mark.parametrize(("args", "env", "line"), [
    (("--port", "-5"), {}, "squall: setting port = -5 (from --port): must be a whole number "
     "from 0 to 65535"),
    (("--log-level", "loud"), {}, "squall: setting log_level = 'loud' (from --log-level): "
     "must be one of debug, info, warning, error, critical"),
    (("--bogus",), {}, "squall: unknown flag --bogus; run.py --help lists every flag"),
    ((), {"SQUALL_BROKER": "http://x"}, "squall: setting broker = 'http://x' (from "
     "SQUALL_BROKER): must be memory://, or a Redis URL: redis://HOST:6379/0, "
     "rediss://HOST:6379/0 (TLS) or unix:///PATH/redis.sock, or "
     "redis+cluster://HOST:7000,HOST:7001 for Redis Cluster"),
    (("--auth-webhook-url", "notaurl"), {}, "squall: setting auth_webhook_url = 'notaurl' "
     "(from --auth-webhook-url): must be an absolute http:// or https:// URL, such as "
     "https://backend.example/squall/authorize"),
    (("token",), {}, "squall: the following arguments are required: --sub; run.py token "
     "--help lists every flag"),
    (("token", "--sub", "a", "--sbuscribe", "x"), {}, "squall: unknown flag --sbuscribe "
     "(did you mean --subscribe?); run.py token --help lists every flag"),
])
def test_a_bad_start_is_one_line_and_status_2(args, env, line):
    result = run_py(*args, env=env)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [line]
    assert result.stdout == ""


@pytest.mark.parametrize("host", ["zz..invalid", "192.0.2.1"])  # no name; not this machine's
def test_a_host_the_server_cannot_listen_on_stops_the_start_with_one_line(host):
    result = run_py("--host", host, "--port", "0", "--log-format", "text")
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(f"squall: setting host = {host!r}: cannot listen on it: ")
    assert line.endswith("(--host or SQUALL_HOST)")


def test_a_bad_hooks_module_stops_the_start_with_one_line(tmp_path):
    config = tmp_path / "squall.toml"
    config.write_text('hooks = ["no_such_module_here"]\n')
    result = run_py("--config", str(config), "--port", "0")
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("squall: setting hooks: module 'no_such_module_here' failed to "
                           "import")
