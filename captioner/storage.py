"""Object storage: one `ObjectStore` interface over the S3 API (boto3) and a local directory.

Keys are relative, '/'-separated names (`jobs/12/cat.jpg`); a store maps them under its own
bucket/prefix or root directory. `open_store(settings.storage_url)` picks the backend:
`s3://bucket/prefix` or `file:///dir`. A missing key raises `ObjectNotFound` on both.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    from captioner.settings import Settings

# Files being written by LocalObjectStore.put; never listed as objects.
_TMP_PREFIX = ".captioner-tmp-"


class StorageError(RuntimeError):
    """A storage operation failed (after retries, where the backend retries)."""


class ObjectNotFound(StorageError, LookupError):
    """The key does not exist in the store."""

    def __init__(self, key: str, where: str = "") -> None:
        self.key = key
        super().__init__(f"object not found: {key!r}" + (f" in {where}" if where else ""))


class InvalidKey(StorageError, ValueError):
    """A key that could escape the store or is otherwise malformed."""


class ObjectTooLarge(StorageError):
    """The object is larger than the caller will read; nothing of it was read."""

    def __init__(self, key: str, size: int, limit: int) -> None:
        self.key, self.size, self.limit = key, size, limit
        super().__init__(f"object {key!r} is {size} bytes, over the limit of {limit}")


# The namespaces the system writes itself, never readable by submitting a key or a prefix (not
# by admins either): uploads (`uploads/<owner id>/...`, captioner.intake.uploads), fetched URLs
# (`urls/<owner id>/...`, captioner.intake.fetch), model checkpoints (`models/`,
# captioner.learning.registry), exports (`exports/`) and image previews (`previews/`,
# captioner.intake.previews).
SYSTEM_PREFIXES = ("uploads/", "urls/", "models/", "exports/", "previews/")

# The longest key a database row can record (`Image.storage_key` is String(1024)).
KEY_MAX_LENGTH = 1024


def check_key(key: str) -> str:
    """Return `key` if it is a safe relative object name; raise InvalidKey otherwise."""
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise InvalidKey(f"invalid object key {key!r}: must be a non-empty relative name")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise InvalidKey(f"invalid object key {key!r}: empty, '.' or '..' path segment")
    if len(key) > KEY_MAX_LENGTH:
        raise InvalidKey(
            f"invalid object key {key[:40]!r}...: {len(key)} characters > limit {KEY_MAX_LENGTH}"
        )
    return key


def check_prefix(prefix: str) -> str:
    """Return `prefix` if every key under it could be a valid key (`check_key`): relative, no
    empty, '.' or '..' segment (the last segment may be empty, `photos/`, or a partial name);
    `""` is the whole store. Raise InvalidKey otherwise."""
    if prefix == "":
        return prefix
    if prefix.startswith("/") or "\\" in prefix or "\x00" in prefix:
        raise InvalidKey(f"invalid prefix {prefix!r}: must be a relative name")
    *dirs, last = prefix.split("/")
    if any(part in ("", ".", "..") for part in dirs) or last in (".", ".."):
        raise InvalidKey(
            f"invalid prefix {prefix!r}: empty, '.' or '..' path segment "
            "(write it as a plain relative path, like photos/2024/)"
        )
    if len(prefix) > KEY_MAX_LENGTH:
        raise InvalidKey(
            f"invalid prefix {prefix[:40]!r}...: {len(prefix)} characters > limit {KEY_MAX_LENGTH}"
        )
    return prefix


class ObjectStore(ABC):
    """Put, get, test, list and hand out read URLs for objects by key."""

    @abstractmethod
    def put(self, key: str, data: bytes, content_type: str | None = None) -> None: ...

    def put_file(
        self, key: str, path: str | os.PathLike[str], content_type: str | None = None
    ) -> None:
        """Put a local file's contents under `key`, read from disk as it is sent (an export of
        any size); the backends override this default, which reads the whole file."""
        self.put(key, Path(path).read_bytes(), content_type)

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The object's bytes; ObjectNotFound if there is none."""

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """A streamed, read-only file object (close it, or use `with`)."""

    def get_at_most(self, key: str, limit: int) -> bytes:
        """The object's bytes if it is at most `limit` bytes long, else ObjectTooLarge without
        reading it; ObjectNotFound if there is none. The backends do it in one request."""
        size = self.size(key)
        if size > limit:
            raise ObjectTooLarge(key, size, limit)
        return self.get(key)

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int:
        """The object's length in bytes, without reading it; ObjectNotFound if there is none."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; removing a missing key is not an error."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys starting with `prefix` (a plain string prefix, as in S3), in sorted order."""

    def for_child_process(self) -> ObjectStore | None:
        """This store as a forked child process may use it without disturbing this process
        (no open connection shared with it), made before the fork; None where no such copy can
        be made. A prefix is listed in a child (`captioner.intake.prefixes`). A plain directory
        shares nothing."""
        return self

    @abstractmethod
    def url(self, key: str, expires_in: int = 3600) -> str:
        """A URL a client can read the object from (presigned on S3)."""

    @abstractmethod
    def uri(self, key: str) -> str:
        """The canonical location of the key (`s3://...` or `file://...`), e.g. for checkpoints."""


class LocalObjectStore(ObjectStore):
    """Objects as files under a root directory; keys that would leave the root are refused."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalObjectStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        check_key(key)
        path = (self.root / key).resolve()
        # resolve() follows symlinks, so a link pointing outside the root is caught here too.
        if not path.is_relative_to(self.root):
            raise InvalidKey(f"invalid object key {key!r}: resolves outside the store")
        return path

    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a reader never sees half an object.
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_file(
        self, key: str, path: str | os.PathLike[str], content_type: str | None = None
    ) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out, open(path, "rb") as source:
                shutil.copyfileobj(source, out, 1024 * 1024)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        with self.open(key) as f:
            return f.read()

    def open(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            return path.open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key, repr(self)) from None

    def get_at_most(self, key: str, limit: int) -> bytes:
        with self.open(key) as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise ObjectTooLarge(key, size, limit)
            return f.read(limit + 1)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(key, repr(self))
        return path.stat().st_size

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_file():
            path.unlink()

    def list(self, prefix: str = "") -> Iterator[str]:
        # Walk only the directory the prefix lives in, not the whole store.
        directory = check_prefix(prefix).rpartition("/")[0]
        start = self.root / directory if directory else self.root
        if directory:
            self._path(directory)  # refuse a link out of the store as for keys
        if not start.is_dir():
            return
        yield from (key for key in self._walk(start) if key.startswith(prefix))

    def _walk(self, directory: Path) -> Iterator[str]:
        # Sorted by key: a directory "a" sorts as "a/", i.e. between "a.txt" and "a0".
        entries = []
        with os.scandir(directory) as it:
            for entry in it:
                if entry.name.startswith(_TMP_PREFIX):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    entries.append((entry.name + "/", Path(entry.path), True))
                elif entry.is_file(follow_symlinks=False):
                    entries.append((entry.name, Path(entry.path), False))
        for _, path, is_dir in sorted(entries):
            if is_dir:
                yield from self._walk(path)
            else:
                yield path.relative_to(self.root).as_posix()

    def url(self, key: str, expires_in: int = 3600) -> str:
        return self._path(key).as_uri()

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()


def _botocore_200_error_check():
    """botocore's handler that turns a 200 response whose body is an error, or no XML document
    at all (cut short), into a 500 that is retried; None if this botocore has none."""
    from botocore import handlers

    return getattr(handlers, "_handle_200_error", None)


def _listing_complete(response_dict, **kwargs) -> None:
    """The listing client's check of a 200 response, in place of botocore's (which parses the
    whole body just to read its root element): a body that is not a whole `ListBucketResult`
    (an `Error`, or cut short) becomes a 500, retried as botocore's would be."""
    body = response_dict.get("body") or b""
    if response_dict.get("status_code") == 200 and not body.rstrip().endswith(
        b"</ListBucketResult>"
    ):
        response_dict["status_code"] = 500


class S3ObjectStore(ObjectStore):
    """Objects in an S3 bucket under an optional prefix, through boto3.

    Works with any S3 API endpoint (MinIO, moto, other S3 services) through `endpoint_url`,
    using path-style addressing there. botocore retries 5xx, throttling and connection
    errors with exponential backoff (`retry_mode`, `max_attempts`).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client=None,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        max_attempts: int = 5,
        retry_mode: str = "standard",
        connect_timeout: float = 10,
        read_timeout: float = 60,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self._botocore_session = self._session = None
        self._client_options: dict[str, Any] = {}
        self._list_client = client
        if client is None:
            import boto3
            import botocore.session
            from botocore.config import Config

            config = Config(
                # total_max_attempts counts the first try; botocore's "max_attempts" would count
                # only retries.
                retries={"mode": retry_mode, "total_max_attempts": max_attempts},
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                # Virtual-host addressing needs DNS per bucket; custom endpoints rarely have it.
                s3={"addressing_style": "path" if endpoint_url else "auto"},
                signature_version="s3v4",
            )
            self._botocore_session = botocore.session.get_session()
            self._session = boto3.session.Session(botocore_session=self._botocore_session)
            self._client_options = {
                "endpoint_url": endpoint_url,
                "region_name": region,
                "aws_access_key_id": access_key_id,
                "aws_secret_access_key": secret_access_key,
                "config": config,
            }
            client = self._new_client(listing=False)
        self.client = client

    @property
    def list_client(self):
        """The client `list` pages with, made on first use from the same session as `client`
        (its credentials and loaded service model) and with the same options, but cheaper per
        listed key (a store given its `client` lists with that one instead):

        - the timestamps of its responses stay the strings the server sent: parsing each listed
          object's LastModified, which `list` does not return, into a datetime was half of
          what listing a key cost (`client` still parses them);
        - botocore's check that a 200 response holds no error, which parses the whole body
          a second time, is replaced by `_listing_complete`.
        """
        if self._list_client is None:
            self._list_client = self._new_client(listing=True)
        return self._list_client

    def _new_client(self, *, listing: bool):
        """A client from the store's session: botocore's own, or the listing client."""
        from botocore.parsers import ResponseParserFactory

        parsers = ResponseParserFactory()
        if listing:
            parsers.set_parser_defaults(timestamp_parser=str)
        # A client keeps the session's parser factory of when it was made.
        self._botocore_session.register_component("response_parser_factory", parsers)
        client = self._session.client("s3", **self._client_options)
        if listing:
            events = client.meta.events
            check = _botocore_200_error_check()
            if check is not None:
                events.unregister("before-parse.s3.*", check)
            events.register_first("before-parse.s3.ListObjectsV2", _listing_complete)
        return client

    def for_child_process(self) -> S3ObjectStore | None:
        """A copy with clients of its own, made from the same session (its credentials are not
        fetched again): a client connects on first use, so the child's open no connection of
        this store's, as this store's clients would share theirs with the child. None for a
        store given its `client`."""
        if self._session is None:
            return None
        child = copy.copy(self)
        child._list_client = None
        child.client = child._new_client(listing=False)
        return child

    def __repr__(self) -> str:
        return f"S3ObjectStore('s3://{self.bucket}/{self.prefix}')"

    def _full(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _error(self, exc: Exception, op: str, key: str) -> StorageError:
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = error.get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                return ObjectNotFound(key, repr(self))
            return StorageError(
                f"S3 {op} {key!r} in {self!r} failed: {code} {error.get('Message', '')}"
            )
        return StorageError(f"S3 {op} {key!r} in {self!r} failed: {exc}")

    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        extra = {"ContentType": content_type} if content_type else {}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._full(key), Body=data, **extra)
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "put", key) from exc

    def put_file(
        self, key: str, path: str | os.PathLike[str], content_type: str | None = None
    ) -> None:
        """Through boto3's managed transfer: multipart for large files, read from disk."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        extra = {"ContentType": content_type} if content_type else None
        try:
            self.client.upload_file(str(path), self.bucket, self._full(key), ExtraArgs=extra)
        except (ClientError, BotoCoreError, S3UploadFailedError) as exc:
            raise self._error(exc, "put", key) from exc

    def get(self, key: str) -> bytes:
        with self.open(key) as body:
            return body.read()

    def open(self, key: str) -> BinaryIO:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._full(key))
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "get", key) from exc
        return response["Body"]  # botocore StreamingBody: read(), iter_chunks(), close()

    def get_at_most(self, key: str, limit: int) -> bytes:
        """One GET: the length comes with the response headers, so an object over `limit` is
        refused before its body is read (the connection is closed, not drained)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._full(key))
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "get", key) from exc
        body = response["Body"]
        try:
            size = int(response.get("ContentLength") or 0)
            if size > limit:
                raise ObjectTooLarge(key, size, limit)
            return body.read(limit + 1)
        except (BotoCoreError, OSError) as exc:
            raise self._error(exc, "get", key) from exc
        finally:
            body.close()

    def exists(self, key: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._full(key))
        except (ClientError, BotoCoreError) as exc:
            error = self._error(exc, "head", key)
            if isinstance(error, ObjectNotFound):
                return False
            raise error from exc
        return True

    def size(self, key: str) -> int:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._full(key))
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "head", key) from exc
        return int(head["ContentLength"])

    def delete(self, key: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._full(key))
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "delete", key) from exc

    def list(self, prefix: str = "") -> Iterator[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        paginator = self.list_client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + check_prefix(prefix))
        try:
            for page in pages:
                for item in page.get("Contents", []):
                    yield item["Key"][len(self.prefix) :]
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "list", prefix) from exc

    def url(self, key: str, expires_in: int = 3600) -> str:
        return self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._full(key)},
            ExpiresIn=expires_in,
        )

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(key)}"


def open_store(url: str | None = None, settings: Settings | None = None) -> ObjectStore:
    """The store for `url` (default `settings.storage_url`): `s3://bucket/prefix` or `file://dir`."""
    if settings is None:
        from captioner.settings import get_settings

        settings = get_settings()
    url = url or settings.storage_url
    if url.startswith("file://"):
        # file:///abs/dir (the usual form) or file://relative/dir.
        return LocalObjectStore(url[len("file://") :])
    if url.startswith("s3://"):
        bucket, _, prefix = url[len("s3://") :].partition("/")
        if not bucket:
            raise StorageError(f"storage URL {url!r} names no bucket")
        secret = settings.s3_secret_access_key
        return S3ObjectStore(
            bucket,
            prefix,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=secret.get_secret_value() if secret else None,
            max_attempts=settings.s3_max_attempts,
            retry_mode=settings.s3_retry_mode,
        )
    raise StorageError(f"unsupported storage URL {url!r}: use s3://bucket/prefix or file:///dir")
