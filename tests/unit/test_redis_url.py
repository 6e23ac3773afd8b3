"""Redis URLs: the ``redis+sentinel://`` and ``redis+cluster://`` forms parsed with errors that name the problem, the
clients and Celery settings built from them, plain URLs left exactly as they were, and no password in any message or
log line."""

from __future__ import annotations

import re

import pytest
import redis
import redis.sentinel

from orchestrator.celery_app import celery_config as from_settings
from orchestrator.errors import StoreUnavailableError
from orchestrator.infra.redis_cluster import (
    DEFAULT_CLUSTER_PORT,
    ClusterUrl,
    cluster_client,
    is_cluster_url,
    parse_cluster_url,
)
from orchestrator.infra.redis_pool import QuickReusePool
from orchestrator.infra.redis_url import (
    DEFAULT_SENTINEL_PORT,
    BlockingSentinelConnectionPool,
    RedisUrlError,
    SentinelUrl,
    blocking_pool,
    broker_connection,
    is_sentinel_url,
    parse_sentinel_url,
    redact_url,
    sync_client,
    url_secrets,
)
from orchestrator.infra.settings import Settings
from orchestrator.state import RedisStateStore
from orchestrator.telemetry.cluster import ClusterCollector
from orchestrator.telemetry.logs import REDACTED, Redactor

PASSWORD = "m4ster/pa:ss@word"
QUOTED = "m4ster%2Fpa%3Ass%40word"
SENTINEL_PASSWORD = "sentinel-pa55word"
URL = f"redis+sentinel://:{QUOTED}@s1:26379,s2:26380,s3/mymaster/2?sentinel_password={SENTINEL_PASSWORD}"


# -- parsing -----------------------------------------------------------------------------------------------------------


def test_a_sentinel_url_names_every_sentinel_the_master_the_database_and_both_passwords() -> None:
    parsed = parse_sentinel_url(URL)

    assert parsed.sentinels == (("s1", 26379), ("s2", 26380), ("s3", DEFAULT_SENTINEL_PORT))
    assert (parsed.master_name, parsed.db) == ("mymaster", 2)
    assert (parsed.username, parsed.password) == (None, PASSWORD)
    assert parsed.sentinel_password == SENTINEL_PASSWORD
    assert not parsed.tls
    assert PASSWORD not in repr(parsed)
    assert SENTINEL_PASSWORD not in repr(parsed)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis+sentinel://127.0.0.1/mymaster", SentinelUrl((("127.0.0.1", 26379),), "mymaster")),
        ("redis+sentinel://h:1/m/15", SentinelUrl((("h", 1),), "m", db=15)),
        ("REDIS+SENTINEL://h/m/", SentinelUrl((("h", 26379),), "m")),
        ("redis+sentinel://[::1]:26380,[fe80::1]/m", SentinelUrl((("::1", 26380), ("fe80::1", 26379)), "m")),
        ("redis+sentinel://app:pw@h/m", SentinelUrl((("h", 26379),), "m", username="app", password="pw")),
        ("redis+sentinel://app@h/m", SentinelUrl((("h", 26379),), "m", username="app")),
        (
            "redis+sentinel://h/m?sentinel_username=mon&sentinel_password=pw",
            SentinelUrl((("h", 26379),), "m", sentinel_username="mon", sentinel_password="pw"),
        ),
        (
            "rediss+sentinel://h/m?ssl_ca_certs=/etc/ca.pem&ssl_cert_reqs=required&ssl_check_hostname=false",
            SentinelUrl(
                (("h", 26379),),
                "m",
                tls=True,
                ssl_options=(
                    ("ssl_ca_certs", "/etc/ca.pem"),
                    ("ssl_cert_reqs", "required"),
                    ("ssl_check_hostname", False),
                ),
            ),
        ),
    ],
)
def test_good_sentinel_urls_parse(url: str, expected: SentinelUrl) -> None:
    assert parse_sentinel_url(url) == expected


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+sentinel://h:26379", "names no master"),
        ("redis+sentinel://h:26379/", "names no master"),
        ("redis+sentinel:///mymaster", "names no Sentinel host"),
        ("redis+sentinel://h:port/m", "bad Sentinel port in 'h:port'"),
        ("redis+sentinel://h:70000/m", "bad Sentinel port in 'h:70000'"),
        ("redis+sentinel://h:0/m", "bad Sentinel port in 'h:0'"),
        ("redis+sentinel://h1,,h2/m", "empty host name"),
        ("redis+sentinel://:26379/m", "empty host name"),
        ("redis+sentinel://[::1/m", "IPv6 address goes in brackets"),
        ("redis+sentinel://h/m/zero", "bad database 'zero'"),
        ("redis+sentinel://h/m/0/extra", "must be /MASTER_NAME or /MASTER_NAME/DB"),
        ("redis+sentinel://h/m?master_name=x", "unknown Sentinel URL option 'master_name'"),
        ("redis+sentinel://h/m?ssl_ca_certs=/ca.pem", "needs TLS: use rediss+sentinel://"),
        ("sentinel://h:26379/m", "starts with redis+sentinel:// or rediss+sentinel://"),
    ],
)
def test_a_malformed_sentinel_url_is_refused_naming_the_problem(url: str, problem: str) -> None:
    with pytest.raises(RedisUrlError) as refused:
        parse_sentinel_url(url)

    assert problem in str(refused.value)


def test_an_error_about_a_sentinel_url_never_shows_its_passwords() -> None:
    bad_port = f"redis+sentinel://:{QUOTED}@h:bad/m?sentinel_password={SENTINEL_PASSWORD}"
    raw_slash = "redis+sentinel://:pass/word@h/m"

    with pytest.raises(RedisUrlError) as port:
        parse_sentinel_url(bad_port)
    with pytest.raises(RedisUrlError) as slash:
        parse_sentinel_url(raw_slash)

    assert "bad Sentinel port in 'h:bad'" in str(port.value)
    assert "percent-encode '/' (%2F)" in str(slash.value)
    for secret in (PASSWORD, QUOTED, SENTINEL_PASSWORD, "pass", "word"):
        assert secret not in str(port.value).replace("password", "") + str(slash.value).replace("password", "")


def test_settings_refuse_a_malformed_sentinel_url_at_once_as_a_value_error() -> None:
    with pytest.raises(ValueError, match="names no master"):
        Settings.from_env({"REDIS_URL": "redis+sentinel://h:26379"})
    with pytest.raises(ValueError, match="bad Sentinel port"):
        Settings.from_env({"ORCH_BROKER_URL": "redis+sentinel://h:x/m"})


@pytest.mark.parametrize("url", ["redis://h:6379/0", "rediss://h/0", "unix:///tmp/r.sock", "amqp://g:g@h//"])
def test_plain_urls_are_not_sentinel_urls(url: str) -> None:
    assert not is_sentinel_url(url)


# -- clients and pools -------------------------------------------------------------------------------------------------


def test_the_state_store_gets_a_blocking_pool_on_the_sentinels_master_without_connecting() -> None:
    store = RedisStateStore.from_url(URL, max_connections=7)
    pool = store.client.connection_pool

    assert isinstance(pool, BlockingSentinelConnectionPool)
    assert isinstance(pool, redis.BlockingConnectionPool)
    assert isinstance(pool, QuickReusePool)
    assert issubclass(pool.connection_class, redis.sentinel.SentinelManagedConnection)
    assert (pool.service_name, pool.max_connections, pool.timeout) == ("mymaster", 7, 30.0)
    assert pool.connection_kwargs["password"] == PASSWORD
    assert pool.connection_kwargs["db"] == 2
    # The socket timeout is the kernel's (orchestrator.infra.redis_pool), on the master's connections too.
    assert (pool.connection_kwargs["socket_timeout"], pool.connection_kwargs["kernel_timeout"]) == (None, 30)
    assert pool.make_connection().kernel_timeout == 30
    assert pool.connection_kwargs["health_check_interval"] == 30
    sentinels = pool.sentinel_manager.sentinels
    assert [s.connection_pool.connection_kwargs["port"] for s in sentinels] == [26379, 26380, 26379]
    assert {s.connection_pool.connection_kwargs["password"] for s in sentinels} == {SENTINEL_PASSWORD}


def test_a_plain_url_still_gets_redis_pys_blocking_pool_its_connections_and_its_own_client() -> None:
    pool = blocking_pool("rediss://:pw@h:6380/3", max_connections=5, timeout=2.0, socket_timeout=9)
    client = sync_client("redis://h:6379/1", socket_timeout=4)

    assert type(pool) is QuickReusePool
    assert isinstance(pool, redis.BlockingConnectionPool)
    assert (pool.max_connections, pool.timeout, pool.connection_kwargs["db"]) == (5, 2.0, 3)
    assert issubclass(pool.connection_class, redis.SSLConnection)
    assert type(client.connection_pool) is redis.ConnectionPool
    assert client.connection_pool.connection_kwargs["socket_timeout"] == 4


def test_rediss_sentinel_speaks_tls_to_the_master_and_to_the_sentinels() -> None:
    client = sync_client("rediss+sentinel://h/m?ssl_ca_certs=/ca.pem", socket_timeout=3)
    pool = client.connection_pool

    assert pool.connection_class is redis.sentinel.SentinelManagedSSLConnection
    assert pool.connection_kwargs["ssl_ca_certs"] == "/ca.pem"
    sentinel = pool.sentinel_manager.sentinels[0].connection_pool
    assert sentinel.connection_class is redis.SSLConnection
    assert sentinel.connection_kwargs["ssl_ca_certs"] == "/ca.pem"


# -- Celery ------------------------------------------------------------------------------------------------------------


def test_celery_gets_kombus_sentinel_urls_and_the_master_name_for_a_sentinel_redis_url() -> None:
    config = from_settings(Settings.from_env({"REDIS_URL": URL, "ORCH_VISIBILITY_TIMEOUT_S": "900"}))

    assert config["broker_url"] == ";".join(
        f"sentinel://:{QUOTED}@{host}/2" for host in ("s1:26379", "s2:26380", "s3:26379")
    )
    options = config["broker_transport_options"]
    assert options["master_name"] == "mymaster"
    assert options["visibility_timeout"] == 900
    assert options["sentinel_kwargs"]["password"] == SENTINEL_PASSWORD
    assert options["sentinel_kwargs"]["socket_timeout"] > 0
    assert "broker_use_ssl" not in config


def test_a_sentinel_broker_url_of_its_own_is_mapped_too_and_tls_goes_to_broker_use_ssl() -> None:
    settings = Settings.from_env(
        {"REDIS_URL": "redis://state:6379/0", "ORCH_BROKER_URL": "rediss+sentinel://a:1,b:2/q?ssl_ca_certs=/ca.pem"}
    )

    config = from_settings(settings)

    assert config["broker_url"] == "sentinel://a:1/0;sentinel://b:2/0"
    assert config["broker_transport_options"]["master_name"] == "q"
    assert config["broker_transport_options"]["sentinel_kwargs"]["ssl"] is True
    assert config["broker_use_ssl"] == {"ssl_cert_reqs": "required", "ssl_ca_certs": "/ca.pem"}


@pytest.mark.parametrize("url", ["redis://:pw@h:6379/0", "rediss://h:6380/0?ssl_cert_reqs=required", "amqp://h//"])
def test_a_plain_broker_url_reaches_celery_unchanged(url: str) -> None:
    variable = "REDIS_URL" if url.startswith("redis") else "ORCH_BROKER_URL"
    config = from_settings(Settings.from_env({variable: url}))

    assert config["broker_url"] == url
    # Only the visibility timeout and kombu's pinned priority lists: no Sentinel options.
    assert config["broker_transport_options"] == {
        "visibility_timeout": Settings().visibility_timeout_s,
        "ack_emulation": False,
        "priority_steps": [0, 3, 6, 9],
        "sep": "\x06\x16",
    }
    assert "broker_use_ssl" not in config
    assert broker_connection(url).transport_options == {}


def test_kombus_unacked_index_on_redis_is_off_unless_asked_for() -> None:
    # The lease index covers every step message; the index would cost two round trips per message (docs/reliability).
    assert from_settings(Settings.from_env({}))["broker_transport_options"]["ack_emulation"] is False
    asked = Settings.from_env({"ORCH_BROKER_UNACKED_INDEX": "true"})

    assert asked.broker_unacked_index is True
    assert from_settings(asked)["broker_transport_options"]["ack_emulation"] is True


# -- no password in messages or logs -----------------------------------------------------------------------------------


def test_redact_url_hides_the_master_and_the_sentinel_passwords() -> None:
    redacted = redact_url(URL)

    assert redacted == "redis+sentinel://:***@s1:26379,s2:26380,s3/mymaster/2?sentinel_password=***"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
    assert redact_url("redis://user:pw@h:6379/0?x=1") == "redis://user:***@h:6379/0?x=1"


def test_url_secrets_finds_both_passwords_raw_and_decoded() -> None:
    assert set(url_secrets(URL)) == {QUOTED, PASSWORD, SENTINEL_PASSWORD}
    assert url_secrets("redis://h:6379/0") == []


def test_log_lines_never_show_a_sentinel_urls_passwords_nor_kombus_form_of_them() -> None:
    redactor = Redactor.from_env({"REDIS_URL": URL})
    kombu_form = from_settings(Settings.from_env({"REDIS_URL": URL}))["broker_url"]
    lines = [
        f"connecting to {URL}",
        f"broker {kombu_form}",
        f"sentinel kwargs {{'password': '{SENTINEL_PASSWORD}'}}",
        f"AUTH failed for {PASSWORD}",
    ]

    for line in lines:
        redacted = redactor.redact(line)
        for secret in (PASSWORD, QUOTED, SENTINEL_PASSWORD):
            assert secret not in redacted, redacted
        assert REDACTED in redacted


def test_a_sentinel_password_option_is_redacted_by_pattern_even_when_the_environment_does_not_hold_it() -> None:
    line = "url redis+sentinel://h/m?sentinel_password=unknown-secret&sentinel_username=mon"

    assert Redactor().redact(line) == f"url redis+sentinel://h/m?sentinel_password={REDACTED}&sentinel_username=mon"


def test_the_metrics_collector_reads_state_and_queue_depth_through_sentinel_without_connecting() -> None:
    shared = ClusterCollector.from_settings(Settings.from_env({"REDIS_URL": URL}))
    separate = ClusterCollector.from_settings(
        Settings.from_env({"REDIS_URL": "redis://state:6379/0", "ORCH_BROKER_URL": "redis+sentinel://b:1/q/4"})
    )

    assert isinstance(shared.store.connection_pool, redis.sentinel.SentinelConnectionPool)
    assert shared.broker is shared.store
    assert separate.broker is not None
    assert separate.broker.connection_pool.service_name == "q"
    assert separate.broker.connection_pool.connection_kwargs["db"] == 4


# -- Redis Cluster -----------------------------------------------------------------------------------------------------

CLUSTER_URL = f"redis+cluster://app:{QUOTED}@n1:7000,n2,[::1]:7002/"


def test_a_cluster_url_names_every_seed_node_and_the_credentials() -> None:
    parsed = parse_cluster_url(CLUSTER_URL)

    assert parsed.nodes == (("n1", 7000), ("n2", DEFAULT_CLUSTER_PORT), ("::1", 7002))
    assert (parsed.username, parsed.password, parsed.tls) == ("app", PASSWORD, False)
    assert PASSWORD not in repr(parsed)
    assert is_cluster_url(CLUSTER_URL)
    assert not is_cluster_url("redis://n1:7000/0")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis+cluster://h", ClusterUrl((("h", 6379),))),
        ("REDIS+CLUSTER://h:1,g:2/", ClusterUrl((("h", 1), ("g", 2)))),
        ("redis+cluster://:pw@h/", ClusterUrl((("h", 6379),), password="pw")),
        (
            "rediss+cluster://h/?ssl_cert_reqs=required&ssl_check_hostname=false",
            ClusterUrl(
                (("h", 6379),), tls=True, ssl_options=(("ssl_cert_reqs", "required"), ("ssl_check_hostname", False))
            ),
        ),
    ],
)
def test_good_cluster_urls_parse(url: str, expected: ClusterUrl) -> None:
    assert parse_cluster_url(url) == expected


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+cluster:///", "names no node"),
        ("redis+cluster://h/1", "only database 0"),
        ("redis+cluster://h:99999/", "bad cluster node port"),
        ("redis+cluster://h,,g/", "empty host name"),
        ("redis+cluster://h/?ssl_ca_certs=/x", "needs TLS: use rediss+cluster://"),
        ("redis+cluster://h/?db=2", "unknown cluster URL option 'db'"),
    ],
)
def test_a_malformed_cluster_url_is_refused_naming_the_problem(url: str, problem: str) -> None:
    with pytest.raises(RedisUrlError, match=re.escape(problem)):
        parse_cluster_url(url)


def test_a_cluster_url_for_state_needs_a_broker_of_its_own_and_is_refused_as_the_broker() -> None:
    with pytest.raises(RedisUrlError, match="set ORCH_BROKER_URL") as no_broker:
        Settings.from_env({"REDIS_URL": CLUSTER_URL})
    with pytest.raises(RedisUrlError, match="cannot use a Redis Cluster") as as_broker:
        Settings.from_env({"REDIS_URL": "redis://state:6379/0", "ORCH_BROKER_URL": CLUSTER_URL})
    settings = Settings.from_env({"REDIS_URL": CLUSTER_URL, "ORCH_BROKER_URL": "redis://broker:6379/0"})

    assert settings.effective_broker_url == "redis://broker:6379/0"
    assert len(str(as_broker.value).splitlines()) == 1
    for refused in (no_broker, as_broker):
        assert PASSWORD not in str(refused.value)
        assert QUOTED not in str(refused.value)


def test_a_cluster_that_does_not_answer_is_a_store_outage_naming_it_without_its_password() -> None:
    with pytest.raises(StoreUnavailableError, match="cannot reach the Redis Cluster") as refused:
        cluster_client(f"redis+cluster://:{QUOTED}@127.0.0.1:1/", socket_connect_timeout=0.5)

    assert QUOTED not in str(refused.value)
    assert PASSWORD not in str(refused.value)


@pytest.mark.parametrize("shards", ["0", "257", "-1"])
def test_orch_shards_outside_its_range_is_refused(shards: str) -> None:
    with pytest.raises(ValueError, match=f"ORCH_SHARDS must be from 1 to 256, not {shards}"):
        Settings.from_env({"ORCH_SHARDS": shards})


@pytest.mark.parametrize("replicas", ["17", "-1"])
def test_orch_wait_replicas_outside_its_range_is_refused(replicas: str) -> None:
    with pytest.raises(ValueError, match=f"ORCH_WAIT_REPLICAS must be from 0 to 16, not {replicas}"):
        Settings.from_env({"ORCH_WAIT_REPLICAS": replicas})


@pytest.mark.parametrize("seconds", ["0", "0.0005", "2", "nan", "inf"])
def test_orch_gil_switch_s_outside_its_range_is_refused(seconds: str) -> None:
    with pytest.raises(ValueError, match=f"ORCH_GIL_SWITCH_S must be from 0.001 to 1.0 seconds, not {float(seconds)}"):
        Settings.from_env({"ORCH_GIL_SWITCH_S": seconds})


def test_a_worker_hands_the_interpreter_over_every_100_ms_unless_told() -> None:
    assert Settings.from_env({}).gil_switch_s == 0.1
    assert Settings.from_env({"ORCH_GIL_SWITCH_S": "0.005"}).gil_switch_s == 0.005


@pytest.mark.parametrize("threshold", ["0", "99", "1000001", "-700"])
def test_orch_gc_threshold_outside_its_range_is_refused(threshold: str) -> None:
    with pytest.raises(ValueError, match=f"ORCH_GC_THRESHOLD must be from 100 to 1000000, not {int(threshold)}$"):
        Settings.from_env({"ORCH_GC_THRESHOLD": threshold})


def test_a_worker_collects_its_youngest_objects_every_20000_allocations_unless_told() -> None:
    assert Settings.from_env({}).gc_threshold == 20_000
    assert Settings.from_env({"ORCH_GC_THRESHOLD": "700"}).gc_threshold == 700
