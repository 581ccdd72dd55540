"""Configuration values that other modules rely on being checked up front."""

from __future__ import annotations

import pytest

from relay.config import Route, load_config, parse_listen, redact_url
from relay.errors import ConfigError


def _load(tmp_path, text: str):
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return load_config(path, environ={})


def test_nameserver_must_be_an_ip_address(tmp_path):
    """A host name in dns.nameservers is refused when the file is read, not later by the resolver."""
    with pytest.raises(ConfigError, match="must be an IP address"):
        _load(tmp_path, '[dns]\nnameservers = ["dns.example.test"]\n')


def test_nameservers_with_ports_are_accepted(tmp_path):
    """IPv4 and bracketed IPv6 name servers, with or without a port, load unchanged."""
    config = _load(tmp_path, '[dns]\nnameservers = ["127.0.0.1:5353", "[::1]:53", "127.0.0.2"]\n')
    assert config.nameservers == ("127.0.0.1:5353", "[::1]:53", "127.0.0.2")


def test_routes_become_route_values_without_showing_passwords(tmp_path):
    """A routes entry loads as the Route the router uses, and its repr hides the password."""
    config = _load(tmp_path, '[routes."Example.TEST"]\nhost = "127.0.0.1"\nport = 2525\n'
                             'username = "u"\npassword = "s3cret"\n')
    route = config.routes["example.test"]
    assert route == Route(host="127.0.0.1", port=2525, username="u", password="s3cret")
    assert "s3cret" not in repr(route)


def test_cpu_affinity_is_a_list_of_cpu_numbers(tmp_path):
    """relay.cpu_affinity loads as a tuple; the default is no pinning."""
    assert _load(tmp_path, "").cpu_affinity == ()
    assert _load(tmp_path, "[relay]\ncpu_affinity = [1, 0]\n").cpu_affinity == (1, 0)


@pytest.mark.parametrize("value, message", [
    ("1", "must be a list of CPU numbers"),
    ("[-1]", "must be a list of CPU numbers"),
    ("[true]", "must be a list of CPU numbers"),
    ('["0"]', "must be a list of CPU numbers"),
    ("[0, 0]", "names a CPU twice"),
])
def test_cpu_affinity_refuses_what_is_not_a_list_of_cpus(tmp_path, value, message):
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, f"[relay]\ncpu_affinity = {value}\n")


def test_submission_tls_files_load_as_paths(tmp_path):
    """submission.tls_cert / tls_key load as given (the files are read when the listener is built); default ""."""
    assert (_load(tmp_path, "").submission_tls_cert, _load(tmp_path, "").submission_tls_key) == ("", "")
    config = _load(tmp_path, '[submission]\ntls_cert = "/etc/relay/tls/cert.pem"\ntls_key = "/etc/relay/tls/key.pem"\n')
    assert (config.submission_tls_cert, config.submission_tls_key) == ("/etc/relay/tls/cert.pem",
                                                                       "/etc/relay/tls/key.pem")


@pytest.mark.parametrize("text", ['tls_cert = "/etc/relay/tls/cert.pem"', 'tls_key = "/etc/relay/tls/key.pem"'])
def test_submission_tls_needs_both_files_or_neither(tmp_path, text):
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, f"[submission]\n{text}\n")
    assert str(caught.value) == "submission.tls_cert and submission.tls_key must be set together, or neither."


def test_submission_tls_paths_must_be_strings(tmp_path):
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, '[submission]\ntls_cert = 1\ntls_key = "k.pem"\n')
    assert str(caught.value) == "submission.tls_cert must be a string, not 1."


@pytest.mark.parametrize("text, seconds", [
    ("", 0.001),                        # the default
    ('commit_delay = "2ms"', 0.002),
    ("commit_delay = 0", 0.0),          # off
    ('commit_delay = "0.5ms"', 0.0005),
])
def test_submission_commit_delay_takes_milliseconds(tmp_path, text, seconds):
    """submission.commit_delay is a duration; "ms" is a unit of every duration."""
    config = _load(tmp_path, f"[submission]\n{text}\n")
    assert config.commit_delay == pytest.approx(seconds)


def test_submission_commit_delay_must_be_a_duration(tmp_path):
    with pytest.raises(ConfigError, match="submission.commit_delay must be a duration"):
        _load(tmp_path, '[submission]\ncommit_delay = "soon"\n')


@pytest.mark.parametrize("value", ['"1m"', "0.2", '"101ms"'])
def test_submission_commit_delay_is_at_most_100ms(tmp_path, value):
    """A minute written for a millisecond ("1m") is refused, not waited before every commit."""
    with pytest.raises(ConfigError, match=r'submission.commit_delay must be at most "100ms".*"m" means minutes'):
        _load(tmp_path, f"[submission]\ncommit_delay = {value}\n")


def test_submission_users_load_as_a_table_of_passwords(tmp_path):
    config = _load(tmp_path, '[submission.users]\nwebapp = "s3cret"\n"app@example.test" = "0ther"\n')
    assert dict(config.submission_users) == {"webapp": "s3cret", "app@example.test": "0ther"}


@pytest.mark.parametrize("user, password, where", [
    ("webapp", "", "submission.users.webapp"),
    ("webapp", "  ", "submission.users.webapp"),                  # blanks only
    ('"app@example.test"', "", 'submission.users."app@example.test"'),
    ('"say \\"hi\\""', "", 'submission.users."say \\"hi\\""'),        # a quote in the name, escaped
])
def test_submission_user_with_an_empty_password_is_refused(tmp_path, user, password, where):
    """An empty password would let AUTH PLAIN in anyone who guesses the name (an open relay on 0.0.0.0)."""
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, f'[submission.users]\nalice = "s3cret"\n{user} = "{password}"\n')
    assert str(caught.value) == f"{where} has an empty password; give every submission user a password."
    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize("listen", ["127.0.0.1:9100", "[::1]:9100", "localhost:9100", "0.0.0.0:9100"])
def test_metrics_listen_takes_an_ip_address_or_localhost(tmp_path, listen):
    assert _load(tmp_path, f'[metrics]\nlisten = "{listen}"\n').metrics_listen == listen


def test_metrics_listen_host_name_is_refused(tmp_path):
    """A host name is refused when the file is read (relayd exits 64), not when relayd fails to listen (69, restarted)."""
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, '[metrics]\nlisten = "metrics.invalid:27599"\n')
    assert str(caught.value) == "metrics.listen must name an IP address or localhost, not 'metrics.invalid'."


def test_parse_listen_maps_localhost_to_loopback():
    """The check of listening addresses shared by submission.listen and metrics.listen."""
    assert parse_listen("localhost:2525", "submission.listen") == ("127.0.0.1", 2525)
    assert parse_listen("[::1]:2525", "submission.listen") == ("::1", 2525)
    with pytest.raises(ConfigError, match=r"^submission.listen must name an IP address or localhost, not 'sub.invalid'.$"):
        parse_listen("sub.invalid:2525", "submission.listen")


@pytest.mark.parametrize("url, shown", [
    ("postgresql+psycopg://relay:s3cret@db.example/relay", "postgresql+psycopg://relay:***@db.example/relay"),
    # SQLAlchemy reads everything up to "@" as the password, "/" included
    ("postgresql+psycopg://relay:se/cr:et@db.example:5432/relay", "postgresql+psycopg://relay:***@db.example:5432/relay"),
    ("postgresql+psycopg://relay@db.example/relay?password=s3cret&sslmode=require",
     "postgresql+psycopg://relay@db.example/relay?password=***&sslmode=require"),
    ("postgresql+psycopg://relay:a@db.example/relay?sslmode=require&PASSWORD=b",
     "postgresql+psycopg://relay:***@db.example/relay?sslmode=require&PASSWORD=***"),
    ("postgresql+psycopg://db.example:5432/relay", "postgresql+psycopg://db.example:5432/relay"),
    ("sqlite:////var/spool/relay/spool.db", "sqlite:////var/spool/relay/spool.db"),
])
def test_redact_url_hides_every_password(url, shown):
    """SPEC: status shows the spool URL without its password; so do errors and relayd's start line."""
    assert redact_url(url) == shown
