"""Local paths and ``s3://`` URIs behind one small API, with atomic writes.

Local writes go to a temporary file in the target folder and are renamed into place
(:func:`recon.formats.files.atomic_writer`, fsynced for ``write_bytes``); S3
objects only become visible when a ``put_object`` or a multipart upload completes, so a
reader never sees half an object in either case. The S3 endpoint comes from
:class:`infra.config.StorageConfig` (``configure``) or ``$AWS_ENDPOINT_URL``.

Objects are read in this process (boto3), never through a shell or a subprocess: a key is
only ever a name. :func:`output_lock` keeps two runs from writing one local output folder.
"""
from __future__ import annotations

import functools
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from infra.config import StorageConfig
from recon.formats.files import atomic_write_bytes, atomic_writer

_config = StorageConfig()


def configure(cfg: StorageConfig) -> None:
    """Use ``cfg`` for every later S3 call of this process."""
    global _config
    _config = cfg
    _client.cache_clear()


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    rest = str(uri)[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {uri!r}")
    return bucket, key


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path parts with ``/`` for S3 and the OS separator for local paths."""
    if is_s3(base):
        out = str(base).rstrip("/")
        for p in parts:
            out += "/" + p.strip("/")
        return out
    return str(Path(base, *parts))


def absolute(uri: str | os.PathLike) -> str:
    """A local path made absolute (``~`` expanded, symlinks resolved) from this process's
    working folder; an s3:// URI as it is."""
    return str(uri) if is_s3(uri) else str(Path(uri).expanduser().resolve())


def relative(uri: str, root: str) -> str:
    """``uri`` relative to ``root`` with ``/`` separators."""
    if is_s3(root):
        prefix = str(root).rstrip("/") + "/"
        if not uri.startswith(prefix):
            raise ValueError(f"{uri} is not under {root}")
        return uri[len(prefix):]
    return Path(uri).resolve().relative_to(Path(root).resolve()).as_posix()


@functools.lru_cache(maxsize=4)
def _client():
    import boto3
    from botocore.config import Config

    endpoint = _config.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=_config.region,
        config=Config(retries={"max_attempts": 5, "mode": "standard"}),
    )


def read_bytes(uri: str | os.PathLike) -> bytes:
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        return _client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return Path(uri).read_bytes()


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` atomically (temp + rename locally; one PUT on S3)."""
    if is_s3(uri):
        if len(data) > _config.multipart_threshold_mb * 2**20:
            import io

            upload_fileobj(io.BytesIO(data), str(uri))
            return
        bucket, key = split_s3(str(uri))
        _client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    atomic_write_bytes(uri, data, fsync=True)


def upload_fileobj(fileobj: IO[bytes], uri: str) -> None:
    """Stream a file object to S3; multipart above the threshold (visible on completion)."""
    from boto3.s3.transfer import TransferConfig

    bucket, key = split_s3(uri)
    threshold = _config.multipart_threshold_mb * 2**20
    _client().upload_fileobj(
        fileobj, bucket, key,
        Config=TransferConfig(multipart_threshold=threshold, multipart_chunksize=threshold),
    )


def put_file(local: str | os.PathLike, uri: str | os.PathLike) -> None:
    """Copy a finished local file to ``uri`` atomically."""
    if is_s3(uri):
        with open(local, "rb") as f:
            upload_fileobj(f, str(uri))
        return
    with open(local, "rb") as src, atomic_writer(uri) as dst:
        shutil.copyfileobj(src, dst)


def put_tree(local: str | os.PathLike, uri: str | os.PathLike) -> int:
    """Copy every file below the local folder ``local`` to the same relative name under
    ``uri`` (:func:`put_file`: each atomically). Returns the number of files."""
    root = Path(local)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    for f in files:
        put_file(f, join(uri, f.relative_to(root).as_posix()))
    return len(files)


def exists(uri: str | os.PathLike) -> bool:
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(str(uri))
        try:
            _client().head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
    return Path(uri).exists()


def list_files(root: str | os.PathLike) -> list[str]:
    """Every file under ``root`` (recursive), as full paths/URIs, sorted. Temporary files
    of unfinished atomic writes (``.name.*.tmp``) and output locks are left out."""
    if is_s3(root):
        bucket, prefix = split_s3(str(root))
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        out: list[str] = []
        for page in _client().get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix
        ):
            out.extend(f"s3://{bucket}/{obj['Key']}" for obj in page.get("Contents", []))
        return sorted(out)
    base = Path(root)
    if not base.is_dir():
        return []
    return sorted(
        str(p) for p in base.rglob("*")
        if p.is_file() and p.name != LOCK_FILE
        and not (p.name.startswith(".") and p.name.endswith(".tmp"))
    )


def delete(uri: str | os.PathLike) -> None:
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        _client().delete_object(Bucket=bucket, Key=key)
        return
    Path(uri).unlink(missing_ok=True)


def open_read(uri: str | os.PathLike) -> IO[bytes]:
    """The object or file opened for streaming reads (``read(n)``, ``close()``): a local file,
    or the body of an S3 GET read as it arrives."""
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        return _client().get_object(Bucket=bucket, Key=key)["Body"]
    return open(uri, "rb")


def stream(uri: str) -> Iterator[bytes]:
    """The object's bytes in chunks (for copying large objects)."""
    with open_read(uri) as f:
        while chunk := f.read(1 << 20):
            yield chunk


LOCK_FILE = ".wildface.lock"


class OutputLocked(RuntimeError):
    """Another run holds the output folder's lock."""


@contextmanager
def output_lock(uri: str | os.PathLike) -> Iterator[None]:
    """Hold the lock of the output folder ``uri`` for the block: a second run asking for it
    (another process, or this one) fails at once with OutputLocked, naming the folder and the
    holder's pid. ``fcntl.flock`` on ``uri/.wildface.lock``: the kernel frees it when the
    holder's file closes, also when the holder crashes or is killed. The file stays (removing
    it would let a waiting run lock the old file while a third creates a new one).

    s3:// prefixes are not locked (S3 has no lock to take): two runs on one prefix still
    write every object whole, but may redo or overwrite each other's work."""
    if is_s3(uri):
        yield
        return
    import fcntl

    folder = Path(uri)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise OutputLocked(
                f"output folder {folder} is in use by another run (pid {holder}); wait for it "
                "to finish or choose another output folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
