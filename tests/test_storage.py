"""ObjectStore over a local directory and over the S3 API (moto's server on loopback)."""

import urllib.request

import pytest
from botocore.awsrequest import AWSResponse

from captioner.settings import Settings
from captioner.storage import (
    KEY_MAX_LENGTH,
    InvalidKey,
    LocalObjectStore,
    ObjectNotFound,
    S3ObjectStore,
    StorageError,
    check_prefix,
    open_store,
)


def test_round_trip(object_store):
    data = bytes(range(256)) * 100
    object_store.put("jobs/1/cat.jpg", data, content_type="image/jpeg")
    assert object_store.exists("jobs/1/cat.jpg")
    assert object_store.get("jobs/1/cat.jpg") == data
    with object_store.open("jobs/1/cat.jpg") as stream:
        assert stream.read(10) == data[:10]
        assert stream.read() == data[10:]
    object_store.put("jobs/1/cat.jpg", b"replaced")
    assert object_store.get("jobs/1/cat.jpg") == b"replaced"
    object_store.delete("jobs/1/cat.jpg")
    assert not object_store.exists("jobs/1/cat.jpg")
    object_store.delete("jobs/1/cat.jpg")  # deleting a missing key is fine


def test_missing_key_is_a_clear_error(object_store):
    assert not object_store.exists("nope/missing.png")
    with pytest.raises(ObjectNotFound, match="nope/missing.png") as info:
        object_store.get("nope/missing.png")
    assert info.value.key == "nope/missing.png"
    with pytest.raises(ObjectNotFound):
        object_store.open("nope/missing.png")


def test_listing_is_by_string_prefix_and_sorted(object_store):
    for key in ["b/1", "a/2", "ab", "a/1", "a.txt", "a/sub/3"]:
        object_store.put(key, key.encode())
    assert list(object_store.list("a/")) == ["a/1", "a/2", "a/sub/3"]
    assert list(object_store.list("a")) == ["a.txt", "a/1", "a/2", "a/sub/3", "ab"]
    assert list(object_store.list()) == ["a.txt", "a/1", "a/2", "a/sub/3", "ab", "b/1"]
    assert list(object_store.list("zzz")) == []


def _put_many(store, keys):
    if isinstance(store, S3ObjectStore):
        # 1,000+ HTTP PUTs would take most of this test's time; seed moto's in-process
        # backend directly instead. Listing (what is tested here) still goes over HTTP.
        from moto.backends import get_backend
        from moto.core import DEFAULT_ACCOUNT_ID

        backend = get_backend("s3")[DEFAULT_ACCOUNT_ID]["global"]
        for key in keys:
            backend.put_object(store.bucket, store.prefix + key, b"x")
    else:
        for key in keys:
            store.put(key, b"x")


def test_listing_more_than_1000_keys(object_store):
    keys = [f"many/{i:05d}.jpg" for i in range(1_050)]
    _put_many(object_store, keys)
    object_store.put("other/1", b"y")
    list_calls = []
    if isinstance(object_store, S3ObjectStore):
        object_store.list_client.meta.events.register(
            "before-call.s3.ListObjectsV2", lambda **kw: list_calls.append(1)
        )
    listed = list(object_store.list("many/"))
    assert listed == keys
    if isinstance(object_store, S3ObjectStore):
        assert len(list_calls) >= 2  # S3 returns at most 1,000 keys a page


def test_read_url(object_store):
    object_store.put("u/file.bin", b"via url")
    with urllib.request.urlopen(object_store.url("u/file.bin", expires_in=60)) as response:
        assert response.read() == b"via url"


@pytest.mark.parametrize("key", ["", "/etc/passwd", "../x", "a/../../x", "a//b", "a\\b", "./a"])
def test_bad_keys_are_refused(object_store, key):
    with pytest.raises(InvalidKey):
        object_store.put(key, b"x")


def test_keys_longer_than_the_image_column_are_refused(object_store):
    from captioner.state.models import Image

    assert KEY_MAX_LENGTH == Image.__table__.c.storage_key.type.length
    with pytest.raises(InvalidKey, match="characters > limit"):
        object_store.put("k" * (KEY_MAX_LENGTH + 1), b"x")


@pytest.mark.parametrize("prefix", ["./x", "a//b", "../x", "x/./y", "/x", "a\\b", "x/.."])
def test_malformed_prefixes_are_refused_by_listing(object_store, prefix):
    with pytest.raises(InvalidKey, match="invalid prefix"):
        list(object_store.list(prefix))


def test_check_prefix_accepts_plain_prefixes():
    for prefix in ("", "photos/", "photos/2024", "a/b/c_", "x/.hidden"):
        assert check_prefix(prefix) == prefix


def test_local_store_refuses_symlink_escape(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    store = LocalObjectStore(tmp_path / "root")
    (store.root / "link").symlink_to(outside)
    with pytest.raises(InvalidKey, match="outside"):
        store.get("link/secret")


def test_s3_keys_live_under_the_prefix(s3_server, s3_bucket):
    store = S3ObjectStore(s3_bucket, "/pre/", endpoint_url=s3_server, region="us-east-1")
    store.put("k.txt", b"1")
    raw = store.client.list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert [o["Key"] for o in raw] == ["pre/k.txt"]
    assert store.uri("k.txt") == f"s3://{s3_bucket}/pre/k.txt"


class _Body:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, **_):
        yield self.data


def _inject_failures(store: S3ObjectStore, operation: str, statuses: list[int], code: str):
    """Answer the first len(statuses) HTTP attempts of `operation` with those error statuses.

    The fake response is handed to botocore in place of the network reply (its `before-send`
    hook), so botocore's own retry handler sees a real 5xx and decides to retry.
    """
    attempts = []

    def before_send(request, **_):
        attempts.append(request.url)
        if len(attempts) <= len(statuses):
            body = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
            return AWSResponse(request.url, statuses[len(attempts) - 1], {}, _Body(body))
        return None  # send for real

    store.client.meta.events.register(f"before-send.s3.{operation}", before_send)
    return attempts


@pytest.mark.parametrize(("status", "code"), [(500, "InternalError"), (503, "SlowDown")])
def test_injected_5xx_is_retried(s3_server, s3_bucket, status, code):
    store = S3ObjectStore(s3_bucket, endpoint_url=s3_server, region="us-east-1", max_attempts=3)
    store.put("flaky.bin", b"worth the wait")
    attempts = _inject_failures(store, "GetObject", [status], code)
    assert store.get("flaky.bin") == b"worth the wait"
    assert len(attempts) == 2


def test_retries_give_up_with_a_storage_error(s3_server, s3_bucket):
    store = S3ObjectStore(s3_bucket, endpoint_url=s3_server, region="us-east-1", max_attempts=2)
    store.put("down.bin", b"x")
    attempts = _inject_failures(store, "GetObject", [500, 500, 500], "InternalError")
    with pytest.raises(StorageError, match="InternalError") as info:
        store.get("down.bin")
    assert not isinstance(info.value, ObjectNotFound)
    assert len(attempts) == 2  # max_attempts counts the first try


def test_open_store_from_settings(tmp_path, s3_server, s3_bucket, monkeypatch):
    local = open_store(settings=Settings())
    assert isinstance(local, LocalObjectStore)
    assert local.root == (tmp_path / "var" / "objects").resolve()

    monkeypatch.setenv("CAPTIONER_STORAGE_URL", f"s3://{s3_bucket}/images")
    monkeypatch.setenv("CAPTIONER_S3_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("CAPTIONER_S3_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("CAPTIONER_S3_SECRET_ACCESS_KEY", "testing")
    remote = open_store(settings=Settings())
    assert isinstance(remote, S3ObjectStore)
    remote.put("a.jpg", b"abc")
    assert remote.uri("a.jpg") == f"s3://{s3_bucket}/images/a.jpg"
    assert remote.get("a.jpg") == b"abc"

    with pytest.raises(StorageError, match="unsupported storage URL"):
        open_store("gs://bucket/x", settings=Settings())


# --- object sizes, read before the bytes (issue 16) ------------------------------------------


def test_size_is_the_stored_length_and_missing_is_object_not_found(object_store):
    object_store.put("sized/a.bin", b"x" * 1234)
    assert object_store.size("sized/a.bin") == 1234
    object_store.put("sized/a.bin", b"")
    assert object_store.size("sized/a.bin") == 0
    with pytest.raises(ObjectNotFound, match="sized/missing"):
        object_store.size("sized/missing")
    with pytest.raises(InvalidKey):
        object_store.size("../escape")


def test_s3_size_comes_from_a_head_request_not_the_body(s3_server, s3_bucket):
    store = S3ObjectStore(s3_bucket, "pre", endpoint_url=s3_server, region="us-east-1")
    store.put("big.bin", b"y" * 5000)
    sent = []
    store.client.meta.events.register(
        "before-send.s3.*", lambda request, **_: sent.append(request.method)
    )
    assert store.size("big.bin") == 5000
    assert sent == ["HEAD"]


def test_system_namespaces_name_every_prefix_the_system_writes():
    from captioner.intake.fetch import fetched_key
    from captioner.intake.previews import preview_key
    from captioner.intake.uploads import upload_key
    from captioner.learning.registry import MODELS_PREFIX
    from captioner.storage import SYSTEM_PREFIXES

    written = [
        upload_key("ab" * 32, "a.png", owner_id=7),
        fetched_key("ab" * 32, "https://example.com/a.png", owner_id=7),
        f"{MODELS_PREFIX}/v1/model.safetensors",
        preview_key("photos/a.png", 256),
    ]
    for key in written:
        assert key.startswith(SYSTEM_PREFIXES), key
    assert "exports/" in SYSTEM_PREFIXES


def test_get_at_most_reads_within_the_limit_and_refuses_beyond_it(object_store):
    from captioner.storage import ObjectTooLarge

    object_store.put("a/small.bin", b"x" * 100)
    assert object_store.get_at_most("a/small.bin", 100) == b"x" * 100
    with pytest.raises(ObjectTooLarge) as refused:
        object_store.get_at_most("a/small.bin", 99)
    assert (refused.value.size, refused.value.limit) == (100, 99)
    with pytest.raises(ObjectNotFound):
        object_store.get_at_most("a/missing.bin", 100)


def test_s3_get_at_most_is_one_get_request(s3_server, s3_bucket):
    from captioner.storage import ObjectTooLarge

    store = S3ObjectStore(s3_bucket, "", endpoint_url=s3_server, region="us-east-1")
    store.put("k.bin", b"y" * 50)
    calls = []
    store.client.meta.events.register(
        "before-call.s3", lambda model, **kw: calls.append(model.name)
    )
    assert store.get_at_most("k.bin", 64) == b"y" * 50
    with pytest.raises(ObjectTooLarge):
        store.get_at_most("k.bin", 10)
    assert calls == ["GetObject", "GetObject"]  # no HEAD before either GET


def test_s3_listing_client_leaves_timestamps_unparsed(s3_server, s3_bucket):
    """Listing skips the per-key datetime parsing (half of a listed key's cost); the store's
    other client still parses them, and the keys listed across pages are exact."""
    from datetime import datetime

    store = S3ObjectStore(s3_bucket, "top", endpoint_url=s3_server, region="us-east-1")
    odd = ["many/a b+c.jpg", "many/caf\u00e9 %41.jpg", "many/q?x=1&y.jpg"]
    keys = sorted([f"many/{i:05d}.jpg" for i in range(1_020)] + odd)
    _put_many(store, keys)
    assert list(store.list("many/")) == keys

    listed = store.list_client.list_objects_v2(Bucket=s3_bucket, Prefix="top/many/", MaxKeys=2)
    assert all(isinstance(item["LastModified"], str) for item in listed["Contents"])
    assert [item["Size"] for item in listed["Contents"]] == [1, 1]
    parsed = store.client.list_objects_v2(Bucket=s3_bucket, Prefix="top/many/", MaxKeys=2)
    assert all(isinstance(item["LastModified"], datetime) for item in parsed["Contents"])
    assert isinstance(
        store.client.head_object(Bucket=s3_bucket, Key="top/" + keys[0])["LastModified"], datetime
    )
    assert store.list_client is store.list_client  # made once

    # A copy for a forked child: clients of its own, each parsing as the original's does.
    child = store.for_child_process()
    assert child.client is not store.client and child.list_client is not store.list_client
    head = child.client.head_object(Bucket=s3_bucket, Key="top/" + keys[0])
    assert isinstance(head["LastModified"], datetime)
    assert list(child.list("many/")) == keys


def test_s3_listing_parses_each_page_once(s3_server, s3_bucket, monkeypatch):
    """botocore's check of a 200 response for an embedded error parses the body a second
    time; the listing client checks the body's end instead (the other client keeps it)."""
    from botocore import handlers

    checked = []
    real = handlers._looks_like_special_case_error
    monkeypatch.setattr(
        handlers,
        "_looks_like_special_case_error",
        lambda *args: checked.append(1) or real(*args),
    )
    store = S3ObjectStore(s3_bucket, endpoint_url=s3_server, region="us-east-1")
    store.put("a.jpg", b"x")
    checked.clear()
    assert list(store.list()) == ["a.jpg"]
    assert checked == []
    store.client.list_objects_v2(Bucket=s3_bucket)
    assert checked == [1]


@pytest.mark.parametrize(
    "body",
    [
        b"<?xml version='1.0'?><Error><Code>InternalError</Code><Message>m</Message></Error>",
        b"<?xml version='1.0'?><ListBucketResult><Name>b</Name><Contents><Key>a.j",
        b"",
    ],
    ids=["error", "cut-short", "empty"],
)
def test_s3_listing_retries_a_200_that_is_no_whole_listing(s3_server, s3_bucket, body):
    store = S3ObjectStore(s3_bucket, endpoint_url=s3_server, region="us-east-1", max_attempts=3)
    store.put("a.jpg", b"x")
    attempts = []

    def before_send(request, **_):
        attempts.append(request.url)
        if len(attempts) == 1:
            return AWSResponse(request.url, 200, {}, _Body(body))
        return None

    store.list_client.meta.events.register("before-send.s3.ListObjectsV2", before_send)
    assert list(store.list()) == ["a.jpg"]
    assert len(attempts) == 2
