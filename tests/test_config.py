"""The one configuration resolver (fastps/_config.py): keyword, then environment, then default."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest

import fastps
from fastps import _C, _cluster, _config, _runtime


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    for s in _config.SETTINGS.values():
        monkeypatch.delenv(s.env, raising=False)
    yield
    monkeypatch.undo()
    fastps.init()  # drop the keywords a test set


def _job(monkeypatch):
    for k, v in dict(WORLD_SIZE="2", RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(k, v)


def test_every_setting_is_in_config_and_documented():
    fields = {f.name for f in dataclasses.fields(fastps.Config)}
    assert fields == set(_config.KEYWORDS)
    doc = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    for name, s in _config.SETTINGS.items():
        assert s.env in doc, s.env
        if s.keyword is not None:
            assert f"`{s.keyword}`" in doc, s.keyword
    # fastps.init takes every keyword setting
    assert set(inspect.signature(fastps.init).parameters) == set(_config.KEYWORDS)


@pytest.mark.parametrize("name,env_value,parsed,keyword", [
    ("num_shards", "3", 3, 2),
    ("chunk_bytes", "65536", 65536, 8192),
    ("timeout", "12.5", 12.5, 7.0),
    ("staleness", "-1", -1, 2),
    ("colocate", "off", False, True),
    ("overlap", "No", False, True),
    ("huge_pages", "0", False, True),
    ("transport", " TCP ", "tcp", "shm"),
    ("liveness_timeout", "0", 0.0, 2.5),
    ("shm_spin_us", "20", 20, 0),
    ("bind", "0.0.0.0", "0.0.0.0", "10.0.0.1"),
])
def test_keyword_beats_environment_beats_default(monkeypatch, name, env_value, parsed, keyword):
    s = _config.SETTINGS[name]
    assert _config.resolve(name) == s.default
    monkeypatch.setenv(s.env, env_value)
    assert _config.resolve(name) == parsed
    assert _config.resolve(name, keyword) == keyword
    monkeypatch.setenv(s.env, "")  # empty: as unset
    assert _config.resolve(name) == s.default


@pytest.mark.parametrize("name,bad", [
    ("num_shards", "-1"), ("num_shards", "many"), ("chunk_bytes", "100"), ("timeout", "0"),
    ("timeout", "soon"), ("staleness", "-2"), ("colocate", "maybe"), ("overlap", "2"),
    ("transport", "rdma"), ("connections", "0"), ("num_servers", "-1"), ("shm_spin_us", "-5"),
    ("shm_ring_bytes", "1"), ("liveness_timeout", "0.01"), ("send_queue_bytes", "1000"),
    ("WORLD_SIZE", "two"), ("MASTER_PORT", "70000"),
])
def test_bad_environment_values_name_the_variable_and_what_is_allowed(monkeypatch, name, bad):
    s = _config.SETTINGS[name]
    monkeypatch.setenv(s.env, bad)
    with pytest.raises(fastps.InvalidArgumentError, match=re.escape(f"environment variable {s.env}={bad!r} is not "
                                                                    f"allowed: it must be {s.allowed}")):
        _config.resolve(name)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_shards=-1), "num_shards=-1 is not allowed: it must be an integer >= 0"),
    (dict(num_shards=1.5), "num_shards=1.5 is not allowed"),
    (dict(staleness="1"), "staleness='1' is not allowed"),
    (dict(colocate=1), "colocate=1 is not allowed: it must be True or False"),
    (dict(transport="udp"), "transport='udp' is not allowed: it must be auto"),
    (dict(shm_ring_bytes=1), f"between {_C.SHM_MIN_RING_BYTES}"),
    (dict(liveness_timeout=-1), "liveness_timeout=-1 is not allowed: it must be 0"),
])
def test_bad_keywords_name_the_keyword(kwargs, match):
    with pytest.raises(fastps.InvalidArgumentError, match=match):
        fastps.init(**kwargs)


def test_a_keyword_wins_over_a_bad_environment_value(monkeypatch):
    monkeypatch.setenv("FASTPS_NUM_SHARDS", "many")
    assert fastps.init(num_shards=1).num_shards == 1


def test_init_keywords_configure_the_distributed_mode(monkeypatch):
    _job(monkeypatch)
    monkeypatch.setenv("FASTPS_STALENESS", "2")
    monkeypatch.setenv("FASTPS_TRANSPORT", "shm")
    assert _cluster.config_from_env().staleness == 2
    fastps.init(staleness=-1, overlap=False, secret="s3")
    cfg = _cluster.config_from_env()
    assert (cfg.rank, cfg.world_size, cfg.staleness, cfg.transport, cfg.overlap, cfg.secret) == \
        (1, 2, -1, "shm", False, "s3")
    assert "s3" not in repr(cfg)  # the secret stays out of logs
    # an explicit override (a `fastps server` flag) beats init's keywords
    assert _cluster.config_from_env(staleness=0).staleness == 0
    fastps.init()  # a later init() replaces the keywords
    assert _cluster.config_from_env().staleness == 2


def test_a_failed_init_keeps_the_earlier_keywords(monkeypatch):
    _job(monkeypatch)
    fastps.init(staleness=1)
    with pytest.raises(fastps.InvalidArgumentError):
        fastps.init(staleness=1, timeout=-1)
    assert _cluster.config_from_env().staleness == 1


def test_distributed_mode_checks(monkeypatch):
    _job(monkeypatch)
    monkeypatch.setenv("FASTPS_COLOCATE", "0")
    with pytest.raises(fastps.InvalidArgumentError, match="FASTPS_NUM_SERVERS >= 1"):
        _cluster.config_from_env()
    monkeypatch.setenv("FASTPS_NUM_SERVERS", "1")
    assert _cluster.config_from_env().num_servers == 1
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(fastps.InvalidArgumentError, match="outside WORLD_SIZE"):
        _cluster.config_from_env()


def test_init_after_the_job_started_must_not_change_settings(monkeypatch):
    class Started:
        config = _cluster.ClusterConfig(rank=0, world_size=2, master_addr="127.0.0.1", master_port=1,
                                        **_config.resolve_all())
    monkeypatch.setattr(_cluster, "_cluster", Started())
    fastps.init()  # the same settings: fine
    with pytest.raises(fastps.InvalidArgumentError, match="changes staleness after the distributed job started"):
        fastps.init(staleness=3)


def test_the_native_settings_reach_the_core(monkeypatch):
    """The core reads no environment: what the resolver decides is what it uses."""
    cfg = _runtime.resolve(shm_spin_us=5)
    kw = _config.transport_kwargs(cfg)
    assert kw["transport"] == "auto" and kw["shm_ring_bytes"] == cfg.shm_ring_bytes
    assert kw["shm_spin_us"] == 5 and kw["shm_yield_us"] == -1
    try:
        assert fastps.init(huge_pages=False).huge_pages is False
        assert _C.huge_pages() is False
        monkeypatch.setenv("FASTPS_HUGE_PAGES", "1")
        assert fastps.init().huge_pages is True and _C.huge_pages() is True
    finally:
        fastps.init()
