"""Storage I/O: the only core module that touches fsspec and pyarrow (DESIGN.md §4).

Owns URIs -> bytes, image listings, Parquet feature shards, manifests (the commit point of every
artifact folder) and the memory-bank artifact (features.npy + provenance.parquet + manifest.json).
"""

from __future__ import annotations

import errno
import hashlib
import io
import itertools
import json
import operator
import os
import posixpath
import re
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from importlib import metadata
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import torch
from fsspec.implementations.local import LocalFileSystem

from patchcore_core.bank import Bank
from patchcore_core.spec import ModelSpec

FORMAT_VERSION = 1
ARTIFACT_KINDS = ("features", "bank", "results", "report")
MANIFEST_NAME = "manifest.json"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MANIFEST_EXTENSIONS = (".txt", ".csv", ".parquet")
FEATURE_DTYPES = {"float16": (torch.float16, pa.float16()), "float32": (torch.float32, pa.float32())}
# Rows per row group of a feature shard: 8192 patches of 1024 float16 values are 16 MiB.
FEATURE_ROW_GROUP = 8192
BANK_FEATURES = "features.npy"
BANK_PROVENANCE = "provenance.parquet"
# Node-local copies of remote banks' features.npy: <tempdir>/patchcore-banks/<key>/features.npy
BANK_CACHE = "patchcore-banks"

# Names of keys that carry credentials (fsspec, s3fs, gcsfs and adlfs option names), matched
# case-insensitively, whole or by part: never written to an artifact, logged or submitted.
SECRET_KEYS = frozenset({
    "key", "secret", "token", "password", "access_key", "secret_key", "session_token",
    "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "account_key", "sas_token",
    "client_secret", "credentials",
})
# Keys whose values may hold such options (a config field, s3fs's nested client options): never
# written to an artifact or logged as they are.
SECRET_CONTAINERS = frozenset({"storage_options", "client_kwargs"})
SECRET_PARTS = ("secret", "password", "session_token", "access_key")
_INPUT_FORMS = (
    "a folder or prefix (searched recursively for " + " ".join(IMAGE_EXTENSIONS) + "), "
    "a glob such as 's3://bucket/images/*.png', or a manifest file "
    "(.txt with one URI per line, .csv or .parquet with a 'uri' column)"
)


# --------------------------------------------------------------------------- filesystems and bytes


def url_to_fs(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(filesystem, path without protocol) for a local path or any fsspec URI.

    S3-compatible endpoints and credentials come from the standard AWS variables
    (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, ...; botocore reads them itself) or from
    `storage_options` (e.g. {"endpoint_url": ..., "anon": true}). Nothing here logs them.
    """
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"expected a non-empty path or URI string, got {uri!r}")
    return fsspec.core.url_to_fs(uri, **(storage_options or {}))


def _is_local(fs: Any) -> bool:
    return isinstance(fs, LocalFileSystem)


def _uncached(fs: Any, path: str | None = None) -> None:
    """Drop fsspec's cached listings (of `path` and its parents, or all): another process (a Ray
    worker) may have written there since, and a stale listing would hide shards or manifests."""
    fs.invalidate_cache(path)


def _to_uri(fs: Any, path: str) -> str:
    """Full URI for an fs path: plain absolute path when local, 'proto://path' otherwise."""
    return path if _is_local(fs) else fs.unstrip_protocol(path)


def join_uri(base: str, *parts: str) -> str:
    """`base/part/...` for paths and URIs alike (never a backslash)."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def normalise_uri(uri: str) -> str:
    """Comparable form of a path or URI, as `list_images` returns it: 'file://' dropped, local
    paths absolute and normalised, no trailing '/' (except the root)."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" not in uri:
        return os.path.abspath(uri)
    return uri.rstrip("/") or uri


def is_dir(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether `uri` is a folder (a prefix holding objects, on object stores)."""
    fs, path = url_to_fs(uri, storage_options)
    _uncached(fs, path)
    return bool(fs.isdir(path))


def is_file(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = url_to_fs(uri, storage_options)
    _uncached(fs, path)
    return bool(fs.isfile(path))


def file_size(uri: str, storage_options: dict[str, Any] | None = None) -> int:
    """Size in bytes of one file, read afresh (FileNotFoundError when missing)."""
    fs, path = url_to_fs(uri, storage_options)
    _uncached(fs, path)
    return int(fs.info(path)["size"])


def file_sizes(folder: str, storage_options: dict[str, Any] | None = None) -> dict[str, int]:
    """Base name -> size in bytes of the files directly in `folder`, in one listing ({} when the
    folder does not exist)."""
    fs, path = url_to_fs(folder, storage_options)
    _uncached(fs, path)
    if not fs.isdir(path):
        return {}
    return {posixpath.basename(e["name"].rstrip("/")): int(e.get("size") or 0)
            for e in fs.ls(path, detail=True) if e.get("type") != "directory"}


def list_files(folder: str, pattern: str = "*", storage_options: dict[str, Any] | None = None
               ) -> list[str]:
    """Sorted URIs of the files directly in `folder` whose names match the glob `pattern`
    (plain absolute paths locally, 'proto://path' otherwise); [] when the folder does not exist."""
    fs, path = url_to_fs(folder, storage_options)
    _uncached(fs, path)
    if not fs.isdir(path):
        return []
    return sorted(_to_uri(fs, p) for p in fs.glob(posixpath.join(path, pattern)) if fs.isfile(p))


def remove_tree(uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Delete every file and folder that `uri` (a path or a glob) names, recursively; nothing
    there is not an error. Used only to clear an output folder the user asked to overwrite."""
    fs, path = url_to_fs(uri, storage_options)
    _uncached(fs)
    for found in fs.glob(path) if _has_magic(path) else [path] if fs.exists(path) else []:
        fs.rm(found, recursive=True)


def exists(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = url_to_fs(uri, storage_options)
    _uncached(fs, path)
    return bool(fs.exists(path))


def remove(uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Delete one file if it exists (used to un-commit a folder before overwriting it)."""
    fs, path = url_to_fs(uri, storage_options)
    _uncached(fs, path)
    if fs.exists(path):
        fs.rm_file(path)


def read_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """Whole file as bytes. FileNotFoundError names the URI."""
    fs, path = url_to_fs(uri, storage_options)
    try:
        return fs.cat_file(path)  # one GET; no existence check first (millions of images)
    except (FileNotFoundError, IsADirectoryError) as err:
        raise FileNotFoundError(f"no such file: {uri}") from err


def write_bytes(uri: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write a whole file atomically: readers see the old file or the new one, never a part.

    Local: write a temporary name in the same folder, fsync, then os.replace (creates the folder).
    Object stores: one PUT (multipart uploads also become visible only on completion).
    """
    fs, path = url_to_fs(uri, storage_options)
    if not _is_local(fs):
        fs.pipe_file(path, bytes(data))
        return
    tmp = _temp_copy(path, data)
    try:
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _temp_copy(path: str, data: bytes) -> str:
    """Write `data` fully (fsynced) to a hidden temporary file beside local `path`; its name."""
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex}")
    written = False
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        written = True
    finally:
        if not written and os.path.exists(tmp):
            os.remove(tmp)  # a failed write leaves no stray temporary file
    return tmp


def _is_s3(fs: Any) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "s3" in protocols


def create_exclusive(uri: str, data: bytes, storage_options: dict[str, Any] | None = None) -> bool:
    """Create a file with `data` only if no file exists at `uri`; False if one does.

    Atomic against a concurrent creator on a local filesystem (a fully written temporary file is
    hard-linked to the name: link fails if the name exists) and on S3 (PUT with If-None-Match: *;
    S3 and S3-compatible servers that implement conditional writes). Other fsspec backends fall
    back to fsspec's check-then-write, which is not atomic.
    """
    fs, path = url_to_fs(uri, storage_options)
    _uncached(fs, path)
    if _is_local(fs):
        tmp = _temp_copy(path, data)
        try:
            os.link(tmp, path)  # atomic and exclusive: EEXIST when the name is taken
        except FileExistsError:
            return False
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return True
    try:
        fs.pipe_file(path, bytes(data), mode="create")
    except FileExistsError:
        return False
    return True


def _local_swap(path: str, expected: bytes, data: bytes | None) -> bool:
    """Local compare-and-swap: replace (data) or delete (None) `path` if it holds `expected`.

    flock on the current file serialises swappers; the inode check after locking catches a file
    replaced by another swapper while this one waited for the lock.
    """
    import fcntl  # POSIX only; local output folders of a Ray job live on POSIX hosts

    while True:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.stat(path).st_ino != os.fstat(fd).st_ino:
                    continue  # replaced while we waited: look at the new file
            except FileNotFoundError:
                return False
            with os.fdopen(os.dup(fd), "rb") as f:
                if f.read() != expected:
                    return False
            if data is None:
                os.remove(path)
            else:
                write_bytes(path, data)
            return True
        finally:
            os.close(fd)  # releases the flock


def replace_if_unchanged(
    uri: str, data: bytes, expected: bytes, storage_options: dict[str, Any] | None = None
) -> bool:
    """Overwrite `uri` with `data` only if it still holds exactly `expected` (compare-and-swap).

    True when replaced; False when the file is missing or holds something else. Atomic locally
    (flock) and on S3 (PUT with If-Match: the ETag read together with `expected`); other backends
    compare then write, which is not atomic.
    """
    fs, path = url_to_fs(uri, storage_options)
    _uncached(fs, path)
    if _is_local(fs):
        return _local_swap(path, expected, data)
    try:
        etag = fs.info(path).get("ETag") if _is_s3(fs) else None
        current = fs.cat_file(path)
    except FileNotFoundError:
        return False
    if current != expected:
        return False
    if etag is None:
        fs.pipe_file(path, bytes(data))
        return True
    try:
        fs.pipe_file(path, bytes(data), IfMatch=etag)
    except FileNotFoundError:
        return False
    except OSError as err:  # s3fs maps a failed If-Match (412 PreconditionFailed) to EINVAL
        if err.errno == errno.EINVAL or isinstance(err, FileExistsError):
            return False
        raise
    return True


def remove_if_unchanged(
    uri: str, expected: bytes, storage_options: dict[str, Any] | None = None
) -> bool:
    """Delete `uri` only if it holds exactly `expected`; True when deleted.

    Atomic locally (flock); on object stores a compare then delete (a small window remains).
    """
    fs, path = url_to_fs(uri, storage_options)
    _uncached(fs, path)
    if _is_local(fs):
        return _local_swap(path, expected, None)
    try:
        if fs.cat_file(path) != expected:
            return False
        fs.rm_file(path)
    except FileNotFoundError:
        return False
    return True


# --------------------------------------------------------------------------- image listings


def _has_magic(uri: str) -> bool:
    return any(c in uri for c in "*?[")


def _is_image_name(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _manifest_entries(fs: Any, path: str, uri: str) -> list[str]:
    """URIs listed in a .txt/.csv/.parquet manifest; relative entries resolve against its folder."""
    lower = path.lower()
    if lower.endswith(".txt"):
        # streamed: one line at a time, never the whole text (10M URIs are 700 MB of text)
        with fs.open(path, "rb") as f:
            return _resolve_entries(fs, path, uri, _text_lines(io.TextIOWrapper(f, encoding="utf-8")))
    data = fs.cat_file(path)
    if lower.endswith(".csv"):
        opts = pa_csv.ConvertOptions(column_types={"uri": pa.string()})
        table = pa_csv.read_csv(pa.BufferReader(data), convert_options=opts)
    else:
        table = pq.read_table(pa.BufferReader(data))
    if "uri" not in table.column_names:
        raise ValueError(
            f"image manifest {uri} has no 'uri' column (columns: {table.column_names}); "
            "add a 'uri' column with one image path or URI per row"
        )
    column = table.column("uri")
    if column.null_count:
        raise ValueError(f"image manifest {uri} has {column.null_count} empty 'uri' values")
    entries = [str(s).strip() for s in column.to_pylist()]
    return _resolve_entries(fs, path, uri, entries)


def _text_lines(lines: Iterable[str]) -> Iterator[str]:
    """The entries of a .txt manifest: stripped lines (str.splitlines separators), minus empty
    ones and '#' comments."""
    for line in lines:
        for part in line.splitlines():  # universal newlines split the file; this adds \v, \f, ...
            entry = part.strip()
            if entry and not entry.startswith("#"):
                yield entry


def _resolve_entries(fs: Any, path: str, uri: str, entries: Iterable[str]) -> list[str]:
    """Manifest entries as URIs: relative ones resolve against the manifest's folder."""
    parent = posixpath.dirname(path)
    out = []
    for entry in entries:
        if entry.startswith("file://"):
            out.append(entry[len("file://") :])
        elif "://" in entry:
            out.append(entry)
        elif _is_local(fs):
            out.append(os.path.normpath(os.path.join(parent, entry)))
        elif entry.startswith("/"):
            raise ValueError(
                f"image manifest {uri} lists {entry!r}: an absolute path without a protocol is "
                "ambiguous in a remote manifest; write a full URI or a path relative to it"
            )
        else:
            out.append(fs.unstrip_protocol(posixpath.normpath(posixpath.join(parent, entry))))
    return out


def list_images(uri: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Sorted, de-duplicated image URIs from a folder/prefix, a glob, a manifest or one image file.

    Folders are searched recursively for IMAGE_EXTENSIONS (any case); a glob keeps the matched files
    with those extensions; manifest entries are taken as they are (not checked for existence).
    Local results are plain absolute paths, remote ones keep their protocol ('s3://b/x.png').
    """
    fs, path = url_to_fs(uri, storage_options)
    _uncached(fs)
    if _has_magic(uri):
        found = [_to_uri(fs, p) for p in fs.glob(path) if _is_image_name(p) and fs.isfile(p)]
    elif path.lower().endswith(MANIFEST_EXTENSIONS) and fs.isfile(path):
        found = _manifest_entries(fs, path, uri)
    elif fs.isdir(path):
        found = [_to_uri(fs, p) for p in fs.find(path) if _is_image_name(p)]
    elif fs.isfile(path) and _is_image_name(path):
        found = [_to_uri(fs, path)]
    else:
        found = []
    if not found:
        raise ValueError(f"no images found at {uri!r}; expected {_INPUT_FORMS}")
    found.sort()  # in place, then drop repeats: no set and no second list of every URI
    if any(map(operator.eq, found, itertools.islice(found, 1, None))):
        found = [u for u, prev in zip(found, [None, *found]) if u != prev]
    return found


def _version_tag(entry: dict[str, Any]) -> str:
    """The content tag of one listing entry: its ETag (object stores), generation (GCS) or
    modification time (local files, as nanoseconds when fsspec gives seconds)."""
    for name in ("ETag", "etag", "generation", "md5Hash"):
        if entry.get(name):
            return str(entry[name]).strip('"')
    mtime = entry.get("mtime", entry.get("LastModified", entry.get("updated")))
    if mtime is None:
        raise ValueError(f"listing entry {entry.get('name')!r} has no ETag or modification time")
    return str(round(mtime * 1e9)) if isinstance(mtime, (int, float)) else str(mtime)


def list_image_versions(
    uri: str, storage_options: dict[str, Any] | None = None
) -> list[tuple[str, int, str]]:
    """(uri, size in bytes, version) of every image `list_images` finds at `uri`, sorted by URI.

    version = "<size>:<ETag or generation or mtime ns>": it changes when the object is rewritten.
    Folders and globs take one recursive listing (no request per image); entries of a manifest
    file are looked up one by one (a missing one is version "missing"). Only these three fields
    are kept per image.
    """
    fs, path = url_to_fs(uri, storage_options)
    _uncached(fs)
    if _has_magic(uri):
        listed = fs.glob(path, detail=True)
    elif fs.isdir(path):
        listed = fs.find(path, detail=True)
    elif fs.isfile(path) and _is_image_name(path):
        listed = {path: fs.info(path)}
    else:
        listed = {}
    items = [(_to_uri(fs, name), entry) for name, entry in listed.items()
             if entry.get("type") != "directory" and _is_image_name(name)]
    if not listed and path.lower().endswith(MANIFEST_EXTENSIONS) and fs.isfile(path):
        items = []
        for entry_uri in _manifest_entries(fs, path, uri):
            entry_fs, entry_path = url_to_fs(entry_uri, storage_options)
            # a listed file that does not exist is version "missing": scored as an error once,
            # and again only once it appears
            info = entry_fs.info(entry_path) if entry_fs.exists(entry_path) else None
            items.append((entry_uri, info))
    found = {}
    for name, entry in items:
        size = int(entry.get("size") or 0) if entry is not None else 0
        found[name] = (size, f"{size}:{_version_tag(entry)}" if entry is not None else "missing")
    if not found:
        raise ValueError(f"no images found at {uri!r}; expected {_INPUT_FORMS}")
    return [(u, size, version) for u, (size, version) in sorted(found.items())]


LISTING_CHUNK = 10_000  # rows per chunk of iter_image_versions: ~10 MB of listing entries at most
_STRINGS = np.dtypes.StringDType()  # numpy's variable-width UTF-8 strings: 16 B + text per row


def _walk_local(path: str) -> Iterator[tuple[str, int, str]]:
    """(path, size, version tag) of every non-directory below `path`, one os.scandir iterator per
    open folder (memory: the depth of the tree, not its size). Size and tag as fsspec's local
    `info` gives them (size of a link's target, the link's own mtime), so the versions equal
    `list_image_versions`'."""
    stack = [path]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                    continue
                try:
                    own = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # deleted since the folder was read: not an input of this listing
                size = own.st_size
                if entry.is_symlink():
                    try:
                        size = entry.stat().st_size
                    except OSError:
                        size = 0  # a dangling link: listed (scored as an error), as fsspec does
                yield entry.path, size, f"{size}:{round(own.st_mtime * 1e9)}"


def _walk_s3(fs: Any, path: str, chunk_size: int) -> Iterator[dict[str, Any]]:
    """Every object below the prefix `path` ("bucket/key"), one ListObjectsV2 page (1000 keys) at a
    time: a flat listing (no delimiter), pulled from s3fs's async iterator `chunk_size` entries per
    trip into its event loop, so at most one chunk of entries exists at once."""
    from fsspec.asyn import sync

    bucket, _, key = path.partition("/")
    pages = fs._iterdir(bucket, delimiter="", prefix=f"{key.rstrip('/')}/" if key else "")

    async def take() -> list[dict[str, Any]]:
        out = []
        async for entry in pages:
            out.append(entry)
            if len(out) == chunk_size:
                break
        return out

    while batch := sync(fs.loop, take):
        yield from batch


def _walk_any(fs: Any, path: str) -> Iterator[dict[str, Any]]:
    """Every entry below `path` on any fsspec filesystem: one `ls` per folder (memory: the largest
    folder plus the folders still to visit)."""
    stack = [path]
    while stack:
        for entry in fs.ls(stack.pop(), detail=True):
            if entry.get("type") == "directory":
                stack.append(entry["name"])
            else:
                yield entry


def _listed_versions(fs: Any, path: str, uri: str, chunk_size: int,
                     storage_options: dict[str, Any] | None) -> Iterator[tuple[str, int, str]]:
    """(uri, size, version) of each image at `uri` (a folder, glob, manifest or one image), in
    listing order, streamed; the forms and versions of `list_image_versions`."""
    pattern = None
    if _has_magic(uri):  # a glob: stream its fixed leading folders, keep the paths it matches
        pattern = re.compile(fsspec.utils.glob_translate(path))
        fixed = path.split("/")
        path = "/".join(fixed[:next(i for i, p in enumerate(fixed) if _has_magic(p))])
    if pattern is not None and not fs.isdir(path):
        return
    if pattern is None and not fs.isdir(path):
        if fs.isfile(path) and _is_image_name(path):
            entries: Iterable[tuple[str, int, str]] = [(path, *_size_version(fs.info(path)))]
        elif path.lower().endswith(MANIFEST_EXTENSIONS) and fs.isfile(path):
            yield from _manifest_versions(fs, path, uri, storage_options)
            return
        else:
            return
    elif _is_local(fs):
        entries = _walk_local(path)
    else:
        walk = _walk_s3(fs, path, chunk_size) if _is_s3(fs) else _walk_any(fs, path)
        entries = ((e["name"], *_size_version(e)) for e in walk if e.get("type") != "directory")
    for name, size, version in entries:
        if _is_image_name(name) and (pattern is None or pattern.match(name)):
            yield _to_uri(fs, name), size, version


def _size_version(entry: dict[str, Any]) -> tuple[int, str]:
    """(size in bytes, "<size>:<tag>") of one listing entry."""
    size = int(entry.get("size") or 0)
    return size, f"{size}:{_version_tag(entry)}"


def _manifest_versions(fs: Any, path: str, uri: str, storage_options: dict[str, Any] | None
                       ) -> Iterator[tuple[str, int, str]]:
    """Entries of a manifest file, sorted and de-duplicated (as list_images: an object listed twice
    is one input), with their versions, one lookup each ("missing" when absent)."""
    entries = _manifest_entries(fs, path, uri)
    entries.sort()  # in place: the list is already held whole
    for entry_uri, previous in zip(entries, [None, *entries]):
        if entry_uri == previous:
            continue
        entry_fs, entry_path = url_to_fs(entry_uri, storage_options)
        info = entry_fs.info(entry_path) if entry_fs.exists(entry_path) else None
        yield (entry_uri, *_size_version(info)) if info is not None else (entry_uri, 0, "missing")


def iter_image_versions(
    uri: str, storage_options: dict[str, Any] | None = None, *, chunk_size: int = LISTING_CHUNK
) -> Iterator[dict[str, np.ndarray]]:
    """`list_image_versions` streamed: chunks {"uri", "version": StringDType (n,), "size": int64
    (n,) bytes} of at most `chunk_size` rows, in listing order (not sorted, not de-duplicated).

    Why: the nightly planner keeps only the inputs not yet scored; holding the whole listing first
    costs ~1 KB per object (fsspec's dicts), 1 GB per million. Here a folder is walked one
    directory entry (local) or one chunk of 1000-key pages (S3) at a time, so the listing itself
    holds O(chunk_size) entries. Manifest files still read their URI list whole (as list_images).
    ValueError when nothing is found.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    fs, path = url_to_fs(uri, storage_options)
    _uncached(fs)
    rows = _listed_versions(fs, path, uri, chunk_size, storage_options)
    found = False
    while batch := list(itertools.islice(rows, chunk_size)):
        found = True
        uris, sizes, versions = zip(*batch)
        del batch
        yield {"uri": np.array(uris, dtype=_STRINGS), "size": np.array(sizes, dtype=np.int64),
               "version": np.array(versions, dtype=_STRINGS)}
    if not found:
        raise ValueError(f"no images found at {uri!r}; expected {_INPUT_FORMS}")


def subfolders(folder: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Sorted base names of the folders (prefixes) directly in `folder`; [] when it is missing."""
    fs, path = url_to_fs(folder, storage_options)
    _uncached(fs, path)
    if not fs.isdir(path):
        return []
    return sorted(posixpath.basename(e["name"].rstrip("/")) for e in fs.ls(path, detail=True)
                  if e.get("type") == "directory")


# --------------------------------------------------------------------------- parquet tables


def write_table(
    uri: str,
    table: pa.Table,
    storage_options: dict[str, Any] | None = None,
    *,
    dictionary: bool | Sequence[str] = True,
    statistics: bool | Sequence[str] = True,
    row_group_size: int | None = None,
) -> None:
    """Write one Parquet file atomically (serialised in memory, then `write_bytes`).

    dictionary, statistics: the columns to dictionary-encode and to keep min/max statistics for
    (True: all, pyarrow's default). row_group_size: rows per row group (None: pyarrow's default).
    """
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, use_dictionary=dictionary, write_statistics=statistics,
                   row_group_size=row_group_size)
    write_bytes(uri, sink.getvalue().to_pybytes(), storage_options)


def read_table(
    uri: str,
    columns: Sequence[str] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> pa.Table:
    """Read one Parquet file (optionally only `columns`)."""
    fs, path = url_to_fs(uri, storage_options)
    _uncached(fs, path)
    if not fs.isfile(path):
        raise FileNotFoundError(f"no such Parquet file: {uri}")
    with fs.open(path, "rb") as f:
        table = pq.read_table(f, columns=list(columns) if columns is not None else None)
    return table


_COLUMN_TYPES = {"string": pa.string(), "float64": pa.float64(), "float32": pa.float32(),
                 "int64": pa.int64(), "int32": pa.int32(), "int16": pa.int16(), "bool": pa.bool_(),
                 "timestamp": pa.timestamp("us", tz="UTC")}


def write_rows(
    uri: str,
    columns: dict[str, tuple[str, Sequence[Any] | np.ndarray]],
    storage_options: dict[str, Any] | None = None,
) -> None:
    """One small Parquet table from {name: (type, values)}, columns in the given order.

    type: one of string, float64, float32, int64, int32, int16, bool, timestamp (UTC datetimes);
    None values are nulls.
    """
    arrays = {}
    for name, (kind, values) in columns.items():
        if kind not in _COLUMN_TYPES:
            raise ValueError(f"column {name!r}: type must be one of {sorted(_COLUMN_TYPES)}, got {kind!r}")
        data = values.tolist() if isinstance(values, np.ndarray) and kind == "string" else values
        arrays[name] = pa.array(data if isinstance(data, np.ndarray) else list(data), _COLUMN_TYPES[kind])
    write_table(uri, pa.table(arrays), storage_options)


def read_rows(
    uri: str, columns: Sequence[str] | None = None, storage_options: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The rows of one Parquet file as dicts (optionally only `columns`)."""
    return read_table(uri, columns, storage_options).to_pylist()


def parquet_num_rows(uri: str, storage_options: dict[str, Any] | None = None) -> int:
    """Row count from a Parquet file's footer (reads only the footer).

    ValueError when the file is not readable Parquet (e.g. truncated: no footer); FileNotFoundError
    when it is missing.
    """
    fs, path = url_to_fs(uri, storage_options)
    try:
        with fs.open(path, "rb") as f:
            return int(pq.read_metadata(f).num_rows)
    except FileNotFoundError:
        raise
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"{uri} is not a readable Parquet file: {err}") from err


def write_feature_shard(
    uri: str,
    image_ids: Sequence[str],
    ys: torch.Tensor,
    xs: torch.Tensor,
    features: torch.Tensor,
    dtype: str = "float16",
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Write patch features as Parquet, one row per patch (DESIGN.md §4 feature store).

    image_ids: n strings, one per row (the image URI; see `model.flatten_patches`).
    ys, xs: (n,) integer grid coordinates, stored as int16.
    features: (n, D) float, stored as fixed_size_list<dtype>[D] in column `feature`.
    """
    if dtype not in FEATURE_DTYPES:
        raise ValueError(f"feature dtype must be one of {sorted(FEATURE_DTYPES)}, got {dtype!r}")
    if features.ndim != 2:
        raise ValueError(f"features must be (n, D), got shape {tuple(features.shape)}")
    n, dim = features.shape
    if len(image_ids) != n or ys.shape != (n,) or xs.shape != (n,):
        raise ValueError(
            f"need one image_id, y and x per feature row: {n} rows, {len(image_ids)} image_ids, "
            f"ys {tuple(ys.shape)}, xs {tuple(xs.shape)}; hint: model.flatten_patches builds them"
        )
    for name, coords in (("ys", ys), ("xs", xs)):
        if n and (int(coords.min()) < 0 or int(coords.max()) > np.iinfo(np.int16).max):
            raise ValueError(f"{name} must lie in [0, 32767] to fit int16")
    torch_dtype, pa_dtype = FEATURE_DTYPES[dtype]
    # Straight to the stored dtype: no copy when the features already have it.
    values = features.detach().to("cpu", torch_dtype).contiguous().numpy().reshape(-1)
    table = pa.table(
        {
            "image_id": pa.array(list(image_ids), type=pa.string()),
            "y": pa.array(ys.cpu().numpy().astype(np.int16), type=pa.int16()),
            "x": pa.array(xs.cpu().numpy().astype(np.int16), type=pa.int16()),
            "feature": pa.FixedSizeListArray.from_arrays(pa.array(values, type=pa_dtype), dim),
        }
    )
    # Only image_id repeats (h*w rows per image) and only image_id, y and x are worth min/max
    # statistics: dictionary-encoding and summarising the feature values costs more than all
    # the rest of the write, for nothing a reader uses.
    write_table(uri, table, storage_options, dictionary=["image_id"],
                statistics=["image_id", "y", "x"], row_group_size=FEATURE_ROW_GROUP)


def read_feature_shard(
    uri: str,
    columns: Sequence[str] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Read a feature shard written by `write_feature_shard`.

    Returns the requested columns (default all): "image_id" -> list[str], "y"/"x" -> (n,) int64,
    "feature" -> (n, D) float32 tensor (float16 shards are widened).
    """
    allowed = ("image_id", "y", "x", "feature")
    wanted = list(allowed if columns is None else columns)
    bad = [c for c in wanted if c not in allowed]
    if bad:
        raise ValueError(f"unknown feature-shard columns {bad}; choose from {list(allowed)}")
    table = read_table(uri, wanted, storage_options)
    out: dict[str, Any] = {}
    for name in wanted:
        column = table.column(name)
        if column.null_count:
            raise ValueError(f"feature shard {uri}: column {name!r} has {column.null_count} nulls")
        if name == "image_id":
            out[name] = [str(s) for s in column.to_pylist()]
        elif name in ("y", "x"):
            out[name] = torch.from_numpy(column.to_numpy().astype(np.int64))
        else:
            if not pa.types.is_fixed_size_list(column.type):
                raise ValueError(
                    f"feature shard {uri}: column 'feature' is {column.type}, expected a "
                    "fixed_size_list of float16/float32; was it written by write_feature_shard?"
                )
            dim = column.type.list_size
            flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
            out[name] = torch.from_numpy(flat.astype(np.float32).reshape(-1, dim))
    return out


# ------------------------------------------------------------------------ manifests (commit point)


def is_secret_key(name: Any) -> bool:
    """Whether a key (a storage option, at any depth) names a credential."""
    lowered = str(name).lower()
    return lowered in SECRET_KEYS or any(part in lowered for part in SECRET_PARTS)


def may_hold_secrets(name: Any) -> bool:
    """Whether a key names a credential or a group of storage options (config fields, manifests)."""
    return is_secret_key(name) or str(name).lower() in SECRET_CONTAINERS


def _find_secrets(value: Any, where: str = "") -> list[str]:
    """Dotted paths of keys that look like credentials."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            if may_hold_secrets(key):
                found.append(f"{where}{key}")
            found += _find_secrets(item, f"{where}{key}.")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found += _find_secrets(item, f"{where}{i}.")
    return found


def _check_kind(kind: str) -> None:
    if kind not in ARTIFACT_KINDS:
        raise ValueError(f"artifact kind must be one of {list(ARTIFACT_KINDS)}, got {kind!r}")


def write_manifest(
    folder: str,
    manifest: dict[str, Any],
    *,
    kind: str,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Publish `folder/manifest.json` (write it LAST: it commits the folder).

    Adds "kind" and "format_version". Refuses keys that look like credentials.
    """
    _check_kind(kind)
    secrets = _find_secrets(manifest)
    if secrets:
        raise ValueError(
            f"refusing to write credentials into {join_uri(folder, MANIFEST_NAME)}: keys {secrets}"
        )
    body = {**manifest, "kind": kind, "format_version": FORMAT_VERSION}
    text = json.dumps(body, indent=2, sort_keys=True, allow_nan=False)
    write_bytes(join_uri(folder, MANIFEST_NAME), text.encode("utf-8"), storage_options)


def is_committed(folder: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether `folder` holds a manifest.json (a finished artifact; its kind is not checked)."""
    return exists(join_uri(folder, MANIFEST_NAME), storage_options)


def read_manifest(
    folder: str, kind: str, storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The manifest of a committed artifact folder of `kind`.

    FileNotFoundError when the folder has no manifest.json (the job did not finish);
    ValueError when it is another kind, another format version, or not valid JSON.
    """
    _check_kind(kind)
    uri = join_uri(folder, MANIFEST_NAME)
    fs, path = url_to_fs(uri, storage_options)
    _uncached(fs, path)
    if not fs.isfile(path):
        raise FileNotFoundError(
            f"{folder} has no {MANIFEST_NAME}: it is not a finished {kind} artifact (the job that "
            "writes it did not finish, or the path is wrong); rerun that job to complete it"
        )
    try:
        manifest = json.loads(fs.cat_file(path).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{uri} is not valid JSON ({err}); rerun the job that wrote it") from err
    if not isinstance(manifest, dict):
        raise ValueError(f"{uri} must hold a JSON object, got {type(manifest).__name__}")
    if manifest.get("kind") != kind:
        raise ValueError(
            f"{folder} is a {manifest.get('kind')!r} artifact, expected {kind!r}; "
            "check which folder you passed"
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{folder} has format_version {manifest.get('format_version')!r}; this build reads "
            f"{FORMAT_VERSION}; re-create the artifact with this version"
        )
    return manifest


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that determine a bank's numbers (for the manifest)."""
    out = {}
    names = ("torch", "numpy", "faiss-cpu", "faiss-gpu-cu12", "faiss-gpu", "timm")
    for name in (*names, "patchcore-at-scale"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # optional package (e.g. only one faiss flavour is installed)
    return out


# --------------------------------------------------------------------------- memory bank artifact


def save_bank(uri: str, bank: Bank, storage_options: dict[str, Any] | None = None) -> None:
    """Write a bank folder: features.npy (M, W) float32, provenance.parquet, manifest.json last.

    W is the stored feature width (features.feature_width: embed_dim, or the rank r of the
    channel map for low-rank specs); the manifest's counts record both.

    An existing manifest is removed first, so a crash mid-write never leaves a committed folder
    whose files disagree.
    """
    remove(join_uri(uri, MANIFEST_NAME), storage_options)
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(bank.features.detach().cpu().numpy(), dtype=np.float32))
    write_bytes(join_uri(uri, BANK_FEATURES), buffer.getvalue(), storage_options)
    provenance = pa.table(
        {
            "image_id": pa.array(list(bank.image_ids), type=pa.string()),
            "y": pa.array(bank.ys.cpu().numpy().astype(np.int16), type=pa.int16()),
            "x": pa.array(bank.xs.cpu().numpy().astype(np.int16), type=pa.int16()),
        }
    )
    write_table(join_uri(uri, BANK_PROVENANCE), provenance, storage_options)
    manifest = {
        "spec": bank.spec.to_json(),
        "counts": {
            "num_entries": int(bank.features.shape[0]),
            "embed_dim": int(bank.spec.embed_dim),
            "feature_width": int(bank.features.shape[1]),
        },
        "projection_seed": int(bank.projection_seed),
        "coverage_radius": float(bank.coverage_radius),
        "image_threshold": None if bank.image_threshold is None else float(bank.image_threshold),
        "pixel_threshold": None if bank.pixel_threshold is None else float(bank.pixel_threshold),
        "files": {"features": BANK_FEATURES, "provenance": BANK_PROVENANCE},
        "versions": package_versions(),
        "info": bank.info,
    }
    write_manifest(uri, manifest, kind="bank", storage_options=storage_options)


def update_bank_manifest(
    uri: str, changes: dict[str, Any], storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Rewrite a committed bank's manifest with `changes` (image_threshold, pixel_threshold,
    info) and return it; features.npy and provenance.parquet stay as they are. One whole-file
    write, so readers see the old manifest or the new one."""
    allowed = {"image_threshold", "pixel_threshold", "info"}
    if not set(changes) <= allowed:
        raise ValueError(f"a bank manifest update may change {sorted(allowed)}, got {sorted(changes)}")
    manifest = read_manifest(uri, "bank", storage_options)
    body = {k: v for k, v in manifest.items() if k not in ("kind", "format_version")}
    for name in ("image_threshold", "pixel_threshold"):
        if changes.get(name) is not None:
            changes = {**changes, name: float(changes[name])}
    body.update(changes)
    write_manifest(uri, body, kind="bank", storage_options=storage_options)
    return {**body, "kind": "bank", "format_version": FORMAT_VERSION}


def load_bank(
    uri: str,
    expected_spec: ModelSpec | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Bank:
    """Read a bank folder written by `save_bank` (no pickle).

    features is memory-mapped from features.npy (copy-on-write, never written back): its pages are
    the page cache's, one copy per node shared by every process that loads the bank. A remote
    features.npy is first copied once per node to `bank_cache_path` (concurrent loaders wait for
    one download). ValueError when `expected_spec` is given and differs from the stored spec, or
    when the files disagree with the manifest.
    """
    manifest = read_manifest(uri, "bank", storage_options)
    if "ensemble" in manifest:
        raise ValueError(
            f"bank {uri} is an ensemble of {len(manifest['ensemble']['members'])} members, not one "
            "bank; load it with patchcore_core.ensemble.load (jobs do), or load one member folder"
        )
    spec = ModelSpec.from_json(manifest["spec"])
    if expected_spec is not None and spec != expected_spec:
        raise ValueError(
            f"bank {uri} was built with spec {spec} but {expected_spec} was expected; "
            "use the same model flags as the bank, or rebuild the bank"
        )
    counts = manifest["counts"]
    # banks written before low-rank storage record only embed_dim, which was their width
    count, dim = counts["num_entries"], counts.get("feature_width", counts["embed_dim"])
    features_uri = join_uri(uri, manifest["files"]["features"])
    fs, path = url_to_fs(features_uri, storage_options)
    if _is_local(fs) and not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {features_uri}")
    local = path if _is_local(fs) else _node_copy(fs, path, features_uri, manifest, count, dim)
    features = _map_features(local, uri, count, dim)
    provenance = read_table(join_uri(uri, manifest["files"]["provenance"]), None, storage_options)
    if provenance.num_rows != count:
        raise ValueError(
            f"bank {uri}: provenance.parquet has {provenance.num_rows} rows, expected {count}"
        )
    return bank_from_parts(manifest, features, provenance)


def bank_from_parts(manifest: dict[str, Any], features: np.ndarray, provenance: pa.Table) -> Bank:
    """Bank from a bank manifest, its (M, W) float32 features and its provenance table (as read
    from the folder; the caller has checked that they agree)."""
    return Bank(
        spec=ModelSpec.from_json(manifest["spec"]),
        features=torch.from_numpy(features),
        image_ids=tuple(str(s) for s in provenance.column("image_id").to_pylist()),
        ys=torch.from_numpy(provenance.column("y").to_numpy().astype(np.int64)),
        xs=torch.from_numpy(provenance.column("x").to_numpy().astype(np.int64)),
        projection_seed=int(manifest["projection_seed"]),
        coverage_radius=float(manifest["coverage_radius"]),
        image_threshold=manifest["image_threshold"],
        pixel_threshold=manifest["pixel_threshold"],
        info=manifest["info"],
    )


def bank_cache_path(manifest: dict[str, Any], size: int, version: str) -> str:
    """Node-local path of the copy of a remote bank's features.npy: under tempfile.gettempdir(),
    keyed by the sha256 of the manifest (canonical JSON: it changes with any refit), the file's
    size and its version on the store (ETag, generation or mtime). Nothing removes old copies."""
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode("utf-8")
    key = hashlib.sha256(canonical + f"\n{size}\n{version}".encode()).hexdigest()[:32]
    return os.path.join(tempfile.gettempdir(), BANK_CACHE, key, BANK_FEATURES)


def _node_copy(fs: Any, path: str, uri: str, manifest: dict[str, Any], count: int, dim: int) -> str:
    """Local path of a complete copy of remote `path` (a bank's features.npy), fetched only if the
    node has none yet: under an exclusive flock, so concurrent loaders on a node download once;
    streamed to a temporary name and renamed, so no reader sees a part. A copy of another size or
    with a header that disagrees with the manifest (truncated, damaged) is fetched again."""
    import fcntl  # POSIX only, as _local_swap

    _uncached(fs, path)
    try:
        info = fs.info(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"no such file: {uri}") from err
    size = int(info["size"])
    version = _version_tag(info)  # the same content tag as the input listings
    target = bank_cache_path(manifest, size, version)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(os.path.join(os.path.dirname(target), ".lock"), "ab") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when `lock` closes
        if _is_complete_copy(target, size, count, dim):
            return target
        tmp = f"{target}.tmp-{uuid.uuid4().hex}"
        try:
            _download(fs, path, tmp)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return target


def _download(fs: Any, path: str, local: str) -> None:
    """Stream remote `path` to the local file `local` (fsynced): never the whole file in memory."""
    fs.get_file(path, local)
    with open(local, "rb") as f:
        os.fsync(f.fileno())


def _is_complete_copy(local: str, size: int, count: int, dim: int) -> bool:
    return (os.path.isfile(local) and os.path.getsize(local) == size
            and _npy_layout(local, count, dim)[0] is None)


def _npy_layout(path: str, count: int, dim: int) -> tuple[str | None, int, bool]:
    """(problem, data offset, Fortran order) of a features.npy that should hold float32
    (count, dim); problem is None when its header says so and the file holds all the data."""
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                return f"features.npy has .npy format version {version}", 0, False
        except ValueError as err:  # not a .npy file, or a header numpy cannot parse
            return f"features.npy has no valid .npy header ({err})", 0, False
        offset = f.tell()
    if dtype != np.float32 or shape != (count, dim):
        return f"features.npy is {dtype} {shape}, manifest says float32 ({count}, {dim})", 0, False
    expected = offset + count * dim * 4
    if os.path.getsize(path) != expected:
        return (f"features.npy is {os.path.getsize(path)} bytes, its header and the manifest "
                f"(float32 ({count}, {dim})) need {expected}"), 0, False
    return None, offset, bool(fortran)


def _map_features(path: str, uri: str, count: int, dim: int) -> np.ndarray:
    """Local features.npy -> (count, dim) float32 copy-on-write memory map of it (writable, so
    torch.from_numpy needs no warning; writes would stay in this process and nothing writes)."""
    problem, offset, fortran = _npy_layout(path, count, dim)
    if problem is not None:
        raise ValueError(f"bank {uri}: {problem}; the folder is corrupt, rebuild the bank")
    if count * dim == 0:  # mmap refuses empty ranges (Bank refuses empty banks)
        return np.zeros((count, dim), np.float32)
    return np.memmap(path, np.float32, mode="c", offset=offset, shape=(count, dim),
                     order="F" if fortran else "C")
