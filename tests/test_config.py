"""The config file: defaults, overrides and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import ConfigError, UpstreamTLSMode, load_config

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "pgwarden.yaml"


def test_the_shipped_example_is_valid_and_matches_the_defaults() -> None:
    assert load_config(EXAMPLE) == load_config(None)


def test_flags_override_the_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("listen: 0.0.0.0:7000\nupstream_tls:\n  mode: disable\n")
    cfg = load_config(f, {"listen": "127.0.0.1:7001", "upstream_tls.mode": "require"})
    assert (cfg.listen.host, cfg.listen.port) == ("127.0.0.1", 7001)
    assert cfg.upstream_tls.mode is UpstreamTLSMode.REQUIRE


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("upstream_tls:\n  mode: sometimes\n", "upstream_tls.mode"),
        ("listne: 1.2.3.4:5\n", "listne: unknown key"),
        ("upstream: db.internal:http\n", "upstream"),
        ("max_message_bytes: 10\n", "max_message_bytes"),
        ("client_tls:\n  required: true\n", "client_tls: required: true needs a cert"),
        ("client_tls:\n  cert: /nonexistent.crt\n  key: /nonexistent.key\n", "does not exist"),
    ],
)
def test_errors_name_the_key_and_the_problem(tmp_path: Path, text: str, named: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(f)
    assert str(f) in str(err.value)
    assert named in str(err.value)


def test_unreadable_and_malformed_files_are_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_upstream_without_port_defaults_to_5432() -> None:
    assert load_config(None, {"upstream": "db.internal"}).upstream.port == 5432
