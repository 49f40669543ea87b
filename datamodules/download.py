"""Resumable, md5-checked download and atomic extraction of the dataset archives.

`download` accepts `http://`, `https://` and `file://` URLs (`file:///abs/path/archive.tar` or
`file://localhost/abs/path`, for a local mirror; the file is copied, never moved or deleted). Any
other scheme, and a bare path without a scheme, is a one-line UserError saying which schemes work
(for an existing bare path it spells out the matching `file://` URL): a URL that is a typo
(`host.robots.ox.ac.uk/...` without `https://`) must not silently turn into a file lookup.

torchvision's `download_url` restarts from zero after an interruption, which hurts for VOC (2 GB)
and SBD (1.4 GB) on slow mirrors, so the transfer itself is a small HTTP Range loop; the md5
(`calculate_md5`) and the extraction (`extract_archive`) are torchvision's.
"""
from __future__ import annotations

import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from torchvision.datasets.utils import calculate_md5, extract_archive

from deeplab_lit.errors import UserError

CHUNK = 1 << 20


def download(url: str, path: Path, md5: str, *, log=print) -> Path:
    """Download `url` (http, https or file) to `path` and check its md5.

    The URL is checked first: an unsupported one, or a `file://` URL naming no file, is a UserError
    before anything is touched. An existing `path` with the right md5 is then kept without reading
    `url`. Otherwise bytes arrive in `<path>.part`: over HTTP a later call resumes from its size
    with a Range request (a server that ignores Range answers 200 and the file restarts); a
    `file://` source is copied in one go and left where it is. The finished file is renamed to
    `path` only if its md5 matches; otherwise it is deleted and UserError says so.
    """
    local = _local_source(url)
    path = Path(path)
    if path.is_file():
        if calculate_md5(path) == md5:
            return path
        log(f"{path} has the wrong md5; deleting it and downloading again")
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    part = _part(path)
    if local is None:
        _fetch_http(url, path, log)
    else:
        _copy_local(local, path, log)
    actual = calculate_md5(part)
    if actual != md5:
        part.unlink()
        deleted = "its copy was deleted" if local is not None else "it was deleted"
        raise UserError(
            f"{url} has md5 {actual}, expected {md5}: the archive is corrupt or not the official one, "
            f"so {deleted}; run again or check the URL"
        )
    part.replace(path)
    return path


def _part(path: Path) -> Path:
    """Where the bytes of `path` arrive until their md5 is checked."""
    return path.with_name(path.name + ".part")


def _local_source(url: str) -> Path | None:
    """The existing local file a `file://` URL names, None for http(s); UserError for anything else."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        return None
    if scheme == "file":
        # file://host/path would name a file on another machine; only the local host is meaningful.
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise UserError(f"{url} is not a local file URL; write file:///absolute/path/to/the/archive")
        source = Path(urllib.request.url2pathname(parts.path))
        if not source.is_file():
            raise UserError(f"the local archive {source} (from {url}) does not exist or is not a file; check --url")
        return source
    hint = ""
    if not scheme and Path(url).expanduser().is_file():
        hint = f" (for this local file: {Path(url).expanduser().resolve().as_uri()})"
    what = f"has the unsupported scheme {scheme}:" if scheme else "has no scheme"
    raise UserError(f"the URL {url} {what}; use http://, https:// or file:///absolute/path{hint}")


def _copy_local(source: Path, path: Path, log) -> None:
    """Copy a local mirror's archive to `path`'s .part file; the source is left as it is."""
    log(f"copying {source} -> {path}")
    try:
        shutil.copyfile(source, _part(path))
    except OSError as error:
        raise UserError(f"copying {source} failed ({error.strerror or error}); check --url and the disk space") from None


def _fetch_http(url: str, path: Path, log) -> None:
    """Append `url`'s bytes to `path`'s .part file, resuming from its size when the server honours Range."""
    part = _part(path)
    start = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "deeplab_lit"})
    if start:
        request.add_header("Range", f"bytes={start}-")
    total = None
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            resumed = start and response.status == 206
            if start and not resumed:
                log(f"{url}: the server does not resume; starting again")
            total = response.length + (start if resumed else 0) if response.length is not None else None
            log(f"downloading {url} -> {path}" + (f" (resuming at {start:,} bytes)" if resumed else ""))
            with open(part, "ab" if resumed else "wb") as out:
                shutil.copyfileobj(response, out, CHUNK)
    except urllib.error.HTTPError as error:
        if error.code == 416 and start:  # the range starts at the end: .part is already complete
            pass
        else:
            raise UserError(f"downloading {url} failed: HTTP {error.code} {error.reason}; check the URL or use --url") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise UserError(f"downloading {url} failed ({reason}); run the same command again to resume") from None
    size = part.stat().st_size
    if total is not None and size < total:
        raise UserError(f"downloading {url} stopped at {size:,} of {total:,} bytes; run the same command again to resume")


def extract_tree(archive: Path, root: Path, member: str) -> Path:
    """Extract `archive` and move its top-level directory `member` into `root`.

    Extraction goes to a temporary directory inside `root` first, so an interrupted extraction never
    leaves a half tree that a later run would take for complete.
    """
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".extract-", dir=root) as scratch:
        print(f"extracting {archive} ...")
        try:
            extract_archive(str(archive), scratch)
        except Exception as error:  # tarfile/zipfile raise many types for a damaged archive
            raise UserError(f"cannot extract {archive} ({error}); delete it and run again") from None
        if not (Path(scratch) / member).is_dir():
            raise UserError(f"{archive} does not contain {member}/; is it the right archive?")
        (Path(scratch) / member).rename(root / member)
    return root / member
