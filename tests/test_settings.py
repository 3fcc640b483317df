"""Settings layers, validation messages and the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from config.settings import FIELDS, Settings, SettingsError, load_settings

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


@pytest.mark.parametrize(("argv", "environ", "message"), [
    (["--port", "abc"], {}, "setting port (from --port) must be a whole number"),
    (["--port", "70000"], {}, "port must be at most 65535"),
    ([], {"SQUALL_MAX_EVENT_BYTES": "0"}, "max_event_bytes must be at least 1"),
    ([], {"SQUALL_HISTORY_TTL": "soon"}, "history_ttl (from SQUALL_HISTORY_TTL) must be a number"),
    (["--workers", "2"], {}, "needs a shared broker"),
    (["--broker", "nowhere"], {}, "must be a URL"),
    (["--ping-interval", "5", "--ping-timeout", "10"], {}, "must not exceed ping_interval"),
    ([], {"SQUALL_ACCESS_LOG": "maybe"}, "must be true or false"),
])
def test_bad_settings_name_the_setting(argv, environ, message):
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_settings(argv, environ=environ)


def test_bad_config_file(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("port = \n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(["--config", str(config)], environ={})
    config.write_text("prot = 1\n")
    with pytest.raises(SettingsError, match="unknown setting 'prot'"):
        load_settings(["--config", str(config)], environ={})
    with pytest.raises(SettingsError, match="cannot read config file"):
        load_settings(["--config", str(tmp_path / "missing.toml")], environ={})


def test_secrets_never_shown():
    settings = load_settings(["--jwt-secret", "s3cret", "--api-keys", "k1"], environ={})
    shown = str(settings.redacted())
    assert "s3cret" not in shown and "k1" not in shown


def run_py(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True,
                          check=False, text=True, timeout=30, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin"})


def test_help_lists_every_flag():
    result = run_py("--help")
    assert result.returncode == 0
    for name, spec in FIELDS.items():
        if spec.metadata["cli"]:
            assert "--" + name.replace("_", "-") in result.stdout
    assert "--config" in result.stdout


def test_bad_setting_stops_the_start_with_one_line():
    result = run_py("--port", "-5")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "squall: setting port must be at least 0, got -5"]
    assert "Traceback" not in result.stderr


def test_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    for name, spec in FIELDS.items():
        shown = f"--{name.replace('_', '-')}" if spec.metadata["cli"] else f"`{name}`"
        assert shown in readme, f"README does not document {name}"
