"""Streaming shards from S3 (or any S3-compatible store) through boto3, with retries that resume mid-object.

URLs take TAO's form ``s3://bucket/key.tar?endpoint=host[:port]&region=us-east-1``. ``endpoint`` may carry
a scheme (``http://127.0.0.1:9000``); without one HTTPS is used. Credentials come only from boto3's
standard chain (environment, ``~/.aws`` profiles, instance roles): a URL that carries keys is refused, and
logs name objects as ``s3://bucket/key`` only.

An object is read as a stream (never held whole in memory). When the connection breaks in the middle,
the reader re-issues the GET with a ``Range`` header from the first byte it has not delivered yet, after an
exponential back-off, so a long shard survives transient network faults.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from clip_tao.errors import DataError

log = logging.getLogger(__name__)

# Query keys that would put a secret into a URL (and so into spec files and logs).
_SECRET_KEYS = {"aws_access_key_id", "aws_secret_access_key", "aws_session_token", "access_key", "secret_key", "token"}
_KNOWN_KEYS = {"endpoint", "region"}

MAX_ATTEMPTS = 6  # per break: the first try plus five retries
BACKOFF_S = 0.5  # doubles after every failed attempt, capped at 8 s


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str
    endpoint: str | None
    region: str | None

    @property
    def name(self) -> str:
        """The object's name for logs and errors: no query string, so nothing sensitive."""
        return f"s3://{self.bucket}/{self.key}"


def redact_url(url: str) -> str:
    """``url`` without user name, password, query or fragment: safe to show in errors and logs."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return f"{parts.scheme}://{host}{parts.path}" if parts.scheme else parts.path.split("?", 1)[0]


def is_s3_url(url: str) -> bool:
    return url.startswith("s3://")


def parse_s3_url(url: str) -> S3Location:
    """``s3://bucket/key?endpoint=...&region=...`` -> :class:`S3Location`; a URL with credentials is refused."""
    parts = urlsplit(url)
    bucket, key = parts.netloc, parts.path.lstrip("/")
    if "@" in bucket:
        raise DataError(
            f"s3://...@{bucket.split('@', 1)[1]}/{key}: credentials do not belong in URLs; "
            "use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an AWS profile"
        )
    if not bucket or not key:
        raise DataError(f"{url.split('?', 1)[0]!r} is not an S3 object URL: write s3://bucket/path/shard.tar")
    query = {k.lower(): v[-1] for k, v in parse_qs(parts.query).items()}
    secret = _SECRET_KEYS & set(query)
    if secret:
        raise DataError(
            f"s3://{bucket}/{key}: the URL carries {sorted(secret)[0]}; credentials do not belong in URLs, "
            "use the AWS environment variables or a profile"
        )
    unknown = set(query) - _KNOWN_KEYS
    if unknown:
        raise DataError(f"s3://{bucket}/{key}: unknown URL parameter {sorted(unknown)[0]!r}; use endpoint and region")
    endpoint = query.get("endpoint")
    if endpoint and "@" in urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}").netloc:
        raise DataError(
            f"s3://{bucket}/{key}: the endpoint carries a user name or password; credentials do not belong in "
            "URLs, use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an AWS profile"
        )
    if endpoint and "://" not in endpoint:
        endpoint = f"https://{endpoint}"
    return S3Location(bucket, key, endpoint, query.get("region"))


_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def s3_client(endpoint: str | None, region: str | None):
    """One boto3 client per (endpoint, region, process); boto3's own retries handle throttling on requests."""
    import os

    import boto3
    from botocore.config import Config

    cache_key = (endpoint, region, os.getpid())  # clients must not cross a fork (DataLoader workers)
    with _clients_lock:
        client = _clients.get(cache_key)
        if client is None:
            config = Config(retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"}, read_timeout=60)
            client = boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region, config=config)
            _clients[cache_key] = client
        return client


class S3ObjectReader(io.RawIOBase):
    """A read-only, forward-only stream of one S3 object that reconnects with ``Range`` after a break."""

    def __init__(self, location: S3Location, max_attempts: int = MAX_ATTEMPTS, backoff_s: float = BACKOFF_S):
        super().__init__()
        self.location = location
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.position = 0  # bytes delivered so far
        self.size: int | None = None
        self.retries = 0  # reconnections made (for tests and logs)
        self._body = None
        self._open()

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        client = s3_client(self.location.endpoint, self.location.region)
        kwargs = {"Bucket": self.location.bucket, "Key": self.location.key}
        if self.position:
            kwargs["Range"] = f"bytes={self.position}-"
        try:
            response = client.get_object(**kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "error")
            raise DataError(
                f"{self.location.name}: cannot open ({code}); check the bucket, key and credentials"
            ) from exc
        except BotoCoreError as exc:
            raise DataError(f"{self.location.name}: cannot open ({type(exc).__name__}: {exc})") from exc
        if self.size is None:
            self.size = response.get("ContentLength")
        self._body = response["Body"]

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        attempt = 0
        while True:
            try:
                data = self._body.read(len(view))
                if not data and self.size is not None and self.position < self.size:
                    # A connection closed early can look like a clean end of stream.
                    raise ConnectionError(f"stream ended at byte {self.position} of {self.size}")
                view[: len(data)] = data
                self.position += len(data)
                return len(data)
            except DataError:
                raise
            except Exception as exc:  # urllib3/botocore/socket errors of a broken connection
                attempt += 1
                if attempt >= self.max_attempts:
                    raise DataError(
                        f"{self.location.name}: reading failed at byte {self.position} after {attempt} attempts "
                        f"({type(exc).__name__}: {exc})"
                    ) from exc
                delay = min(8.0, self.backoff_s * 2 ** (attempt - 1))
                log.warning(
                    "%s: connection broke at byte %d (%s); retrying in %.1fs",
                    self.location.name, self.position, type(exc).__name__, delay,
                )  # fmt: skip
                time.sleep(delay)
                self.retries += 1
                self._close_body()
                try:
                    self._open()
                except DataError:
                    if attempt + 1 >= self.max_attempts:
                        raise

    def _close_body(self) -> None:
        if self._body is not None:
            # A broken connection may fail to close; it is dropped either way.
            with contextlib.suppress(Exception):
                self._body.close()
            self._body = None

    def close(self) -> None:
        self._close_body()
        super().close()


def open_s3(url: str, buffer_size: int = 1 << 20) -> io.BufferedReader:
    """A buffered, retrying stream of the object at ``url``."""
    return io.BufferedReader(S3ObjectReader(parse_s3_url(url)), buffer_size=buffer_size)


def s3_object_exists(url: str) -> bool:
    location = parse_s3_url(url)
    try:
        s3_client(location.endpoint, location.region).head_object(Bucket=location.bucket, Key=location.key)
    except Exception:
        return False
    return True


def read_s3_bytes(url: str) -> bytes:
    """A small object (``sizes.json``) read whole."""
    with open_s3(url) as f:
        return f.read()
