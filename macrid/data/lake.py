"""The lake: URIs -> pyarrow filesystems, Parquet tables, JSON, atomic publication.

Every lake write goes through `staged_dir`: files are written under a hidden
sibling folder and renamed into place only when all of them are complete, so a
reader never sees a half-written dataset or table.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import botocore.exceptions
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from macrid.errors import DataError, from_os_error


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """'s3://bucket/prefix', '/a/b', 'file:///a/b' or 'relative/dir' -> (filesystem, path)."""
    if uri.startswith("s3://"):
        path = uri.removeprefix("s3://").rstrip("/")
        if not path:
            raise DataError(f"{uri}: an S3 URI needs a bucket, e.g. s3://my-bucket/lake")
        return s3_filesystem(), path
    if "://" in uri and not uri.startswith("file://"):
        scheme = uri.split("://", 1)[0]
        raise DataError(f"{uri}: the {scheme}:// scheme is not supported; use s3://bucket/prefix or a local path")
    return pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3 filesystem from the standard AWS environment, or the instance role when no keys are set.

    AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL point it at an S3-compatible store (MinIO, moto, Ceph).
    """
    env = os.environ
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    key = (endpoint, env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY"), env.get("AWS_SESSION_TOKEN"),
           env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"))
    return _s3_filesystem(*key)


@functools.lru_cache(maxsize=8)
def _s3_filesystem(endpoint, access_key, secret_key, token, region) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=int(os.environ.get("MACRID_S3_RETRIES", 5))),
        "connect_timeout": 5, "request_timeout": 60,
    }
    if endpoint:
        scheme, _, host = endpoint.rpartition("://")
        kwargs.update(endpoint_override=host or endpoint, scheme=scheme or "https")
    if access_key and secret_key:
        kwargs.update(access_key=access_key, secret_key=secret_key, session_token=token)
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


@contextlib.contextmanager
def explained(uri: str) -> Iterator[None]:
    """Turn S3 errors into messages that say what to check."""
    try:
        yield
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        if not is_s3(uri):  # a local path the machine refused (permissions, a full or read-only disk, ...)
            problem = from_os_error(e, uri)
            if problem is None:
                raise
            raise problem from None
        text = str(e)
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS"
        if "NETWORK_CONNECTION" in text or "Could not connect" in text or "Couldn't resolve" in text:
            hint = f"cannot reach the S3 endpoint {endpoint}; check AWS_ENDPOINT_URL and the network"
        elif "NO_SUCH_BUCKET" in text or "bucket does not exist" in text:
            hint = f"bucket {uri[5:].split('/')[0]!r} does not exist at {endpoint}; create it or fix the URI"
        elif any(s in text for s in ("ACCESS_DENIED", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                                     "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "403")):
            hint = "access denied; check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the instance role"
        else:
            hint = "S3 request failed"
        raise DataError(f"{uri}: {hint} ({text.splitlines()[0][:200]})") from None


def delta_storage_options(uri: str) -> dict[str, str]:
    """deltalake's object-store options from the standard AWS environment (the same one pyarrow reads)."""
    if not is_s3(uri):
        return {}
    env, opts = os.environ, {"conditional_put": "etag"}  # safe concurrent commits where the store supports it
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            opts["AWS_ALLOW_HTTP"] = "true"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        if env.get(key):
            opts[key] = env[key]
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        opts["AWS_REGION"] = region
    return opts


def check_root(uri: str) -> None:
    """Fail early, with the cause, when a lake root cannot be used (endpoint, credentials, bucket)."""
    if not is_s3(uri):
        return
    fs, path = resolve(uri)
    bucket = path.split("/")[0]
    with explained(uri):
        info = fs.get_file_info(bucket)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{uri}: bucket {bucket!r} does not exist (or these credentials cannot see it)")


def join(*parts: str) -> str:
    return "/".join(p.rstrip("/") for p in parts if p)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    with explained(uri):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with explained(uri), fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{uri} does not exist") from None


def write_bytes(uri: str, data: bytes) -> None:
    """Write one object atomically: an S3 PUT is atomic; locally a temp file is renamed into place."""
    fs, path = resolve(uri)
    with explained(uri):
        if is_s3(uri):
            with fs.open_output_stream(path) as f:
                f.write(data)
            return
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)


def read_json(uri: str) -> dict[str, Any]:
    """A JSON record of the lake; a DataError that names it when it is damaged (truncated, not UTF-8, not JSON)."""
    data = read_bytes(uri)
    try:
        return json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{uri}: damaged JSON record ({str(e).splitlines()[0][:160]}); restore it from a backup, "
                        "or re-run the job that writes it (prepare for a dataset's _meta.json, train --resume or a "
                        "new run for a run's records)") from None


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True).encode())


def pointer_token(uri: str) -> str | None:
    """What `switch_pointer` later checks a pointer file against: its S3 ETag, or locally a hash of its bytes;
    None when it does not exist."""
    return _token(uri)


def _token(uri: str) -> str | None:
    if not exists(uri):  # through pyarrow first: its errors name what to check (endpoint, bucket, credentials)
        return None
    if is_s3(uri):

        bucket, key = _bucket_key(uri)
        with _boto_explained(uri):
            try:
                return _s3_client().head_object(Bucket=bucket, Key=key)["ETag"]
            except botocore.exceptions.ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
    return hashlib.sha256(read_bytes(uri)).hexdigest()


def switch_pointer(uri: str, obj: Any, expected: str | None) -> None:
    """Write the JSON pointer `uri` only if it is still what `pointer_token` returned (`expected`; None: it must
    not exist): a compare-and-swap, so of two jobs racing to publish only one wins, and the other learns it.
    S3: a conditional PUT (If-Match / If-None-Match); locally: under an exclusive lock beside the file."""
    data = json.dumps(obj, indent=2, sort_keys=True).encode()
    if is_s3(uri):

        bucket, key = _bucket_key(uri)
        condition = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}
        with _boto_explained(uri):
            try:
                _s3_client().put_object(Bucket=bucket, Key=key, Body=data, **condition)
            except botocore.exceptions.ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                    raise PointerMoved(uri) from None
                raise
        return

    fs, path = resolve(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with open(f"{path.rsplit('/', 1)[0]}/.{path.rsplit('/', 1)[1]}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when the process dies
        if _token(uri) != expected:
            raise PointerMoved(uri)
        write_bytes(uri, data)


class PointerMoved(DataError):
    """Another job switched the pointer since this one read it."""

    def __init__(self, uri: str):
        super().__init__(f"{uri}: another job changed it while this one ran")


def _bucket_key(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


@contextlib.contextmanager
def _boto_explained(uri: str) -> Iterator[None]:
    """boto3's errors (no endpoint, no credentials, a refused request) as a DataError that names the URI; a
    MacridError's text hides the credentials an endpoint URL may carry."""
    try:
        yield
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS"
        raise DataError(f"{uri}: S3 request to {endpoint} failed ({str(e).splitlines()[0][:200]}); check "
                        "AWS_ENDPOINT_URL, the credentials and the bucket") from None


def _s3_client():
    # the standard variables (AWS_ENDPOINT_URL, credentials, region), as pyarrow's S3 file system reads them
    return boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                        or None)


def write_parquet(uri: str, table: pa.Table, scratch: bool = False) -> None:
    """scratch: a job's intermediate file, read once by the next stage (lz4, no checksums: faster)."""
    fs, path = resolve(uri)
    with explained(uri):
        if not is_s3(uri):
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        if scratch:
            pq.write_table(table, path, filesystem=fs, compression="lz4")
            return
        # page checksums: a reader that verifies them (load_train_share) names a bit-rotted shard instead of
        # training on garbage
        pq.write_table(table, path, filesystem=fs, compression="zstd", write_page_checksum=True)


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file."""
    fs, path = resolve(uri)
    with explained(uri):
        return pq.read_table(path, columns=columns, filesystem=fs)


def list_parquet(uri: str) -> list[str]:
    """Paths (without scheme) of the .parquet files directly under a table folder, in name order."""
    fs, path = resolve(uri)
    with explained(uri):
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.path for i in infos if i.base_name.endswith(".parquet"))


def read_table(uri: str, columns: list[str] | None = None, filters=None) -> pa.Table:
    """Read every part-*.parquet file under a table folder, in name order.

    filters: a pyarrow expression (e.g. pyarrow.dataset.field("user_id") == 42) applied while reading, so
    row groups that cannot match are skipped by their statistics."""
    fs, _ = resolve(uri)
    files = list_parquet(uri)
    if not files:
        raise DataError(f"{uri}: no Parquet files found; run jobs/prepare.py to build the dataset")
    with explained(uri):
        return pa.concat_tables([pq.read_table(f, columns=columns, filesystem=fs, filters=filters) for f in files])


@contextlib.contextmanager
def staged_dir(uri: str, overwrite: bool = False, marker: str = "_meta.json") -> Iterator[str]:
    """Publish a folder atomically. Yields where to write; the caller writes `marker` last.

    Local: everything goes to a hidden sibling folder that is renamed to `uri` on success and
    deleted on failure. S3 has no rename: files go straight to `uri`, an existing `marker` is
    deleted before anything else changes, and readers treat a folder without its marker as
    incomplete (load_dataset refuses it); a failure deletes what was written.
    """
    fs, path = resolve(uri)
    with explained(uri):
        present = fs.get_file_info(path).type != pafs.FileType.NotFound
        if is_s3(uri) and present:
            present = bool(fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))
    if present and not overwrite:
        raise DataError(f"{uri} already exists; pass --overwrite to replace it")
    if is_s3(uri):
        with explained(uri):
            if present:
                if fs.get_file_info(f"{path}/{marker}").type != pafs.FileType.NotFound:
                    fs.delete_file(f"{path}/{marker}")  # readers now see an incomplete folder
                fs.delete_dir_contents(path, missing_dir_ok=True)
            try:
                yield uri
            except BaseException:
                fs.delete_dir_contents(path, missing_dir_ok=True)
                raise
        return
    parent, name = path.rsplit("/", 1)
    stage = f"{parent}/.{name}.staging-{uuid.uuid4().hex[:8]}"
    fs.create_dir(stage, recursive=True)
    try:
        yield stage
    except BaseException:
        fs.delete_dir(stage)
        raise
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        old = f"{parent}/.{name}.old-{uuid.uuid4().hex[:8]}"
        fs.move(path, old)
        fs.move(stage, path)
        fs.delete_dir(old)
    else:
        fs.move(stage, path)
