"""Settings: embedded defaults, CAPTIONER_* overrides, validation, read once."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from captioner.settings import Settings, get_settings, reset_settings


def test_defaults_are_embedded_and_follow_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPTIONER_DATA_DIR", str(tmp_path / "state"))
    s = Settings()
    assert s.database_url == f"sqlite:///{tmp_path / 'state' / 'captioner.db'}"
    assert s.storage_url == f"file://{tmp_path / 'state' / 'objects'}"
    assert s.checkpoint_dir == tmp_path / "state" / "checkpoints"
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert (s.batch_size, s.max_attempts, s.device) == (32, 3, "auto")
    assert s.max_image_pixels == 89_478_485


def test_relative_data_dir_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CAPTIONER_DATA_DIR")
    s = Settings()
    assert s.database_url == f"sqlite:///{tmp_path / 'var' / 'captioner.db'}"
    assert Path(s.storage_url.removeprefix("file://")).is_absolute()


def test_env_overrides(monkeypatch):
    monkeypatch.setenv("CAPTIONER_DATABASE_URL", "postgresql+psycopg://u@db/captioner")
    monkeypatch.setenv("CAPTIONER_STORAGE_URL", "s3://bucket/some/prefix")
    monkeypatch.setenv("CAPTIONER_S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("CAPTIONER_S3_SECRET_ACCESS_KEY", "hunter2")
    monkeypatch.setenv("CAPTIONER_BATCH_SIZE", "8")
    monkeypatch.setenv("CAPTIONER_DEVICE", "cuda:1")
    s = Settings()
    assert s.database_url == "postgresql+psycopg://u@db/captioner"
    assert s.storage_url == "s3://bucket/some/prefix"
    assert s.s3_endpoint_url == "http://127.0.0.1:9000"
    assert s.batch_size == 8
    assert s.device == "cuda:1"
    # Secrets never show up in a repr or a log line.
    assert "hunter2" not in repr(s)
    assert s.s3_secret_access_key.get_secret_value() == "hunter2"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CAPTIONER_BATCH_SIZE", "0"),
        ("CAPTIONER_BATCH_SIZE", "many"),
        ("CAPTIONER_DEVICE", "mps"),
        ("CAPTIONER_STORAGE_URL", "ftp://host/dir"),
        ("CAPTIONER_S3_RETRY_MODE", "legacy-ish"),
    ],
)
def test_invalid_values_are_refused(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=name.removeprefix("CAPTIONER_").lower()):
        Settings()


def test_read_once_until_reset(monkeypatch):
    first = get_settings()
    monkeypatch.setenv("CAPTIONER_BATCH_SIZE", "7")
    assert get_settings() is first and first.batch_size == 32
    reset_settings()
    assert get_settings().batch_size == 7


def test_every_field_is_documented():
    # The config table in the docs is generated from these descriptions.
    missing = [name for name, f in Settings.model_fields.items() if not f.description]
    assert missing == []


def test_url_and_webhook_allow_lists_are_separate(monkeypatch):
    monkeypatch.setenv("CAPTIONER_URL_ALLOW_HOSTS", '["images.internal"]')
    monkeypatch.setenv("CAPTIONER_WEBHOOK_ALLOW_HOSTS", '["hooks.internal", "10.0.0.0/8"]')
    s = Settings()
    assert s.url_allow_hosts == ["images.internal"]
    assert s.webhook_allow_hosts == ["hooks.internal", "10.0.0.0/8"]
    monkeypatch.delenv("CAPTIONER_WEBHOOK_ALLOW_HOSTS")
    assert Settings().webhook_allow_hosts == [] and Settings().url_allow_hosts == [
        "images.internal"
    ]


def test_the_default_secret_key_is_known_and_only_it_counts_as_default(monkeypatch):
    from captioner.settings import DEFAULT_SECRET_KEY

    assert Settings().uses_default_secret_key
    assert Settings().secret_key.get_secret_value() == DEFAULT_SECRET_KEY
    monkeypatch.setenv("CAPTIONER_SECRET_KEY", "test-secret")
    assert not Settings().uses_default_secret_key


def test_interactive_limit_and_metrics_token_settings(monkeypatch):
    s = Settings()
    assert s.interactive_max_images == 16 and s.metrics_token is None
    monkeypatch.setenv("CAPTIONER_INTERACTIVE_MAX_IMAGES", "4")
    monkeypatch.setenv("CAPTIONER_METRICS_TOKEN", "scrape-me")
    s = Settings()
    assert s.interactive_max_images == 4
    assert s.metrics_token.get_secret_value() == "scrape-me"
    monkeypatch.setenv("CAPTIONER_INTERACTIVE_MAX_IMAGES", "0")
    with pytest.raises(ValidationError):
        Settings()


def test_an_empty_metrics_token_means_none(monkeypatch):
    monkeypatch.setenv("CAPTIONER_METRICS_TOKEN", "")
    assert Settings().metrics_token is None


def test_session_lifetime_public_url_and_proxy_hops(monkeypatch):
    s = Settings()
    assert (s.session_lifetime_hours, s.public_url, s.trusted_proxy_hops) == (12.0, "", 0)
    assert not s.public_url_is_https
    monkeypatch.setenv("CAPTIONER_SESSION_LIFETIME_HOURS", "0.5")
    monkeypatch.setenv("CAPTIONER_PUBLIC_URL", "HTTPS://captions.example.com/")
    monkeypatch.setenv("CAPTIONER_TRUSTED_PROXY_HOPS", "2")
    s = Settings()
    assert s.session_lifetime_hours == 0.5 and s.trusted_proxy_hops == 2
    assert s.public_url == "HTTPS://captions.example.com" and s.public_url_is_https
    monkeypatch.setenv("CAPTIONER_PUBLIC_URL", "http://captions.internal")
    assert not Settings().public_url_is_https


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CAPTIONER_SESSION_LIFETIME_HOURS", "0"),
        ("CAPTIONER_PUBLIC_URL", "captions.example.com"),
        ("CAPTIONER_TRUSTED_PROXY_HOPS", "-1"),
    ],
)
def test_invalid_session_settings_are_refused(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=name.removeprefix("CAPTIONER_").lower()):
        Settings()
