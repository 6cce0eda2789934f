"""A prefix listed by a forked child process while the parent registers its pages
(`captioner.intake.prefixes.listed_in_child`), over a local directory and over S3 (moto)."""

import os
from collections.abc import Iterator

import pytest

from captioner.intake import prefixes
from captioner.storage import LocalObjectStore, S3ObjectStore, StorageError


class _ListingStore(LocalObjectStore):
    """A directory store whose listing is given: `keys`, then `fail` raised if set, each key
    drawn also appended to the file `drawn` (written by whichever process lists)."""

    def __init__(self, root, keys, drawn, fail: Exception | None = None) -> None:
        super().__init__(root)
        self.keys, self.drawn, self.fail = keys, drawn, fail

    def list(self, prefix: str = "") -> Iterator[str]:
        with open(self.drawn, "a") as drawn:
            drawn.write(f"pid {os.getpid()}\n")
            drawn.flush()
            for key in self.keys:
                drawn.write(key + "\n")
                drawn.flush()
                yield key
        if self.fail is not None:
            raise self.fail


def _drawn(path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_pages_come_in_order_from_another_process(tmp_path):
    keys = [f"p/{i:04d}.jpg" for i in range(25)] + ["p/readme.txt"]
    drawn = tmp_path / "drawn"
    store = _ListingStore(tmp_path / "objects", keys, drawn)
    pages = list(prefixes.listed_in_child(store, "p/", 10))
    assert pages == [keys[:10], keys[10:20], keys[20:25]]
    [lister] = [line for line in _drawn(drawn) if line.startswith("pid ")]
    assert lister != f"pid {os.getpid()}"


def test_an_error_in_the_child_is_raised_after_the_pages_before_it(tmp_path):
    keys = [f"p/{i}.jpg" for i in range(5)]
    store = _ListingStore(
        tmp_path / "objects", keys, tmp_path / "drawn", StorageError("S3 list 'p/' failed: boom")
    )
    pages = prefixes.listed_in_child(store, "p/", 2)
    assert next(pages) == keys[:2]
    assert next(pages) == keys[2:4]
    with pytest.raises(StorageError, match="failed: boom"):  # the page it cut short is lost
        next(pages)


def test_an_unpicklable_error_still_reaches_the_parent(tmp_path):
    class Odd(Exception):
        def __reduce__(self):
            raise TypeError("not picklable")

    store = _ListingStore(tmp_path / "objects", [], tmp_path / "drawn", Odd("strange"))
    with pytest.raises(StorageError, match="Odd: strange"):
        list(prefixes.listed_in_child(store, "p/", 2))


def test_closing_early_ends_the_child(tmp_path):
    drawn = tmp_path / "drawn"
    keys = [f"p/{i:06d}.jpg" for i in range(200_000)]
    store = _ListingStore(tmp_path / "objects", keys, drawn)
    pages = prefixes.listed_in_child(store, "p/", 100)
    assert next(pages) == keys[:100]
    pages.close()
    lister = int(_drawn(drawn)[0].split()[1])
    with pytest.raises(ProcessLookupError):  # ended and reaped
        os.kill(lister, 0)
    # The pipe holds a few pages: the child stopped far short of the whole listing.
    assert len(_drawn(drawn)) < 50_000


def test_s3_prefix_is_listed_in_a_child_without_disturbing_the_parent(s3_server, s3_bucket):
    store = S3ObjectStore(s3_bucket, "top", endpoint_url=s3_server, region="us-east-1")
    keys = [f"p/{i:05d}.jpg" for i in range(1_005)]
    for key in keys[:5]:
        store.put(key, b"x")
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    for key in keys[5:]:
        backend.put_object(s3_bucket, "top/" + key, b"x")
    assert list(store.list("p/0000")) == keys[:10]  # the parent's listing client, connected
    pages = list(prefixes.listed_in_child(store, "p/", 400))
    assert pages == [keys[:400], keys[400:800], keys[800:]]
    # The parent's clients still work on their own connections.
    assert list(store.list("p/0000")) == keys[:10]
    assert store.get(keys[0]) == b"x"


def test_a_store_given_its_client_is_listed_in_this_process(s3_server, s3_bucket):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    store = S3ObjectStore(s3_bucket, client=client)
    for i in range(3):
        store.put(f"p/{i}.jpg", b"x")
    assert store.list_client is client
    assert list(prefixes.listed_in_child(store, "p/", 2)) == [["p/0.jpg", "p/1.jpg"], ["p/2.jpg"]]


def test_no_process_to_be_had_lists_in_this_process(tmp_path, monkeypatch):
    def no_fork():
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)
    drawn = tmp_path / "drawn"
    keys = [f"p/{i}.jpg" for i in range(3)]
    store = _ListingStore(tmp_path / "objects", keys, drawn)
    assert list(prefixes.listed_in_child(store, "p/", 2)) == [keys[:2], keys[2:]]
    assert _drawn(drawn)[0] == f"pid {os.getpid()}"
