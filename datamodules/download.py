"""Resumable, md5-checked download and safe, atomic extraction of the dataset archives.

Downloaded archives are data from someone else, never code, and the guarantees below hold for any
archive, whatever its md5:

- `download` accepts `http://`, `https://` and `file://` URLs (`file:///abs/path/archive.tar` or
  `file://localhost/abs/path`, for a local mirror; the file is copied, never moved or deleted). Any
  other scheme, and a bare path without a scheme, is a one-line UserError saying which schemes
  work (for an existing bare path it spells out the matching `file://` URL): a URL that is a typo
  (`host.robots.ox.ac.uk/...` without `https://`) must not silently turn into a file lookup.
- The md5 is checked before an archive is used; a wrong one deletes the bytes received.
- `safe_extract` writes regular files, directories and (tar only) links that point down into the
  tree, nothing else: members with an absolute name, a `..` component or a drive letter, tar links
  whose target is absolute or has `..` (even one that would stay inside), zip symlinks, and device
  or fifo entries are refused before any member is written. setuid/setgid/sticky bits and
  group/other write bits are never restored.
- `extract_tree` extracts into a scratch directory inside the root and moves the expected top-level
  directory into place only when everything went well, so a refused, damaged or interrupted
  extraction leaves no half tree in the root and nothing outside it.

torchvision's `download_url` restarts from zero after an interruption, which hurts for VOC (2 GB)
and SBD (1.4 GB) on slow mirrors, so the transfer itself is a small HTTP Range loop; the md5 is
torchvision's `calculate_md5`. torchvision's `extract_archive` is not used: it writes whatever the
archive says (`..`, absolute paths, links out of the tree, device files, setuid bits).
"""
from __future__ import annotations

import os
import platform
import posixpath
import re
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from torchvision.datasets.utils import calculate_md5

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
    """Safely extract `archive` and move its top-level directory `member` into `root`.

    Extraction goes to a scratch directory inside `root` first, removed whatever happens, so a
    refused, damaged or interrupted extraction never leaves a half tree that a later run would take
    for complete, and `root / member` appears in one rename.
    """
    target = root / member
    # Checked before the (long) extraction: rename() replaces an empty directory, nothing else.
    if target.is_symlink() or (target.exists() and not (target.is_dir() and not any(target.iterdir()))):
        raise UserError(f"{target} already exists but is incomplete; delete it and run again")
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".extract-", dir=root) as scratch:
        print(f"extracting {archive} ...")
        safe_extract(archive, Path(scratch))
        top = Path(scratch) / member
        # A symlink named `member` would be moved as a link and read elsewhere in root: not a tree.
        if top.is_symlink() or not top.is_dir():
            raise UserError(f"{archive} does not contain {member}/; is it the right archive?")
        top.rename(target)
    return target


def safe_extract(archive: Path, destination: Path) -> None:
    """Extract a tar (plain, gz, bz2, xz) or zip (by its `.zip` name) `archive` into `destination`.

    Guarantees: nothing is ever written outside `destination`. Every member is checked before any
    is written; refused are absolute names, `..` components, drive letters, tar links whose target
    is absolute or has `..`, zip symlinks (zipfile would write them as files holding the target),
    and device, fifo or other special entries. A refused member is a one-line UserError naming the
    archive, the member and the reason. Files never get setuid/setgid/sticky or group/other write
    bits. A damaged archive (truncated, not an archive) is a one-line UserError too. Either error
    may come after some members were written inside `destination` (a damaged archive, or a link
    already in `destination`), so extract into a fresh scratch directory, as `extract_tree` does,
    to keep nothing of a failed extraction.
    """
    archive, destination = Path(archive), Path(destination)
    extract = _extract_zip if archive.name.lower().endswith(".zip") else _extract_tar
    try:
        extract(archive, destination)
    except UserError:
        raise
    except Exception as error:  # tarfile/zipfile/gzip/lzma raise many types for a damaged archive
        # tarfile's "r:*" lists each compression it tried on lines of their own: keep the first.
        reason = str(error).splitlines()[0].rstrip(":") if str(error) else type(error).__name__
        raise UserError(f"cannot extract {archive} ({reason}); delete it and run again") from None


def _refused(archive: Path, member: str, reason: str) -> UserError:
    return UserError(
        f"refused to extract {archive}: member {member!r} {reason}; "
        "the archive is not the official one, delete it or check --url"
    )


def _path_problem(path: str) -> str | None:
    """Why a member's name (or a tar link's target) could reach outside the destination, or None.

    Backslashes count as separators too: harmless on POSIX, but no dataset member needs one.
    """
    if path.startswith(("/", "\\")):
        return "has an absolute path"
    if re.match(r"[A-Za-z]:", path):
        return "starts with a drive letter"
    if ".." in re.split(r"[/\\]", path):
        return "has a '..' component"
    return None


def _extract_tar(archive: Path, destination: Path) -> None:
    """Every member checked first (before anything is written), then tarfile's "data" filter.

    The data filter follows links with os.path.realpath, which CPython before 3.11.13 / 3.12.11 /
    3.13.4 let deep chains of links slip past (CVE-2025-4517, python/cpython#135034). So the first
    pass adds a rule that needs no realpath: names and link targets are relative and have no `..`.
    A link then only ever points below the directory it sits in, and no chain of such links can
    climb out of the destination. The filter during extraction stays as a second line: it sees the
    files already written (and links that were in `destination` before).
    """
    if not hasattr(tarfile, "data_filter"):
        raise UserError(
            f"extracting {archive} safely needs tarfile's data filter, new in Python 3.11.4; "
            f"this is Python {platform.python_version()}: upgrade to Python 3.11.4 or newer"
        )
    with tarfile.open(archive, "r:*") as tar:
        tar.errorlevel = 1  # a refused member raises (never just a debug message)
        for member in tar:
            _check_tar_member(archive, member, destination)
        try:
            tar.extractall(destination, filter="data")
        except tarfile.FilterError as error:
            raise _refused(archive, error.tarinfo.name, _filter_reason(error)) from None


def _check_tar_member(archive: Path, member: tarfile.TarInfo, destination: Path) -> None:
    # The data filter would strip a leading "/" and extract inside; an official archive has none.
    problem = _path_problem(member.name)
    if not problem and not member.isdir() and posixpath.normpath(member.name) == ".":
        problem = "has no name of its own (it would replace the destination)"
    if not problem and (member.issym() or member.islnk()):
        problem = _path_problem(member.linkname)
        problem = problem and f"is a link whose target {problem}"
    if problem:
        raise _refused(archive, member.name, problem)
    try:
        tarfile.data_filter(member, str(destination))
    except tarfile.FilterError as error:
        raise _refused(archive, member.name, _filter_reason(error)) from None


def _filter_reason(error: tarfile.FilterError) -> str:
    reasons = [
        (tarfile.AbsoluteLinkError, "is a link to an absolute path"),
        (tarfile.LinkOutsideDestinationError, "is a link leading outside the destination"),
        (tarfile.SpecialFileError, "is a device, fifo or other special file"),
        (tarfile.AbsolutePathError, "has an absolute path"),
        (tarfile.OutsideDestinationError, "would be written outside the destination"),
    ]
    return next((text for kind, text in reasons if isinstance(error, kind)), str(error))


def _extract_zip(archive: Path, destination: Path) -> None:
    """Regular files and directories only, all members checked before the first is written.

    zipfile restores no permission bits; files get 0o755 when the archive marks them executable by
    their owner, else 0o644 (never setuid/setgid/sticky), directories the default mode.
    """
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        for info in members:
            problem = _path_problem(info.filename) or _zip_type_problem(info)
            if problem:
                raise _refused(archive, info.filename, problem)
        destination.mkdir(parents=True, exist_ok=True)
        real_destination = os.path.realpath(destination)
        for info in members:
            _write_zip_member(archive, zf, info, destination, real_destination)


def _zip_type_problem(info: zipfile.ZipInfo) -> str | None:
    """Unix file type bits (external_attr >> 16; 0 when made elsewhere) other than file/dir."""
    kind = stat.S_IFMT(info.external_attr >> 16)
    if stat.S_ISLNK(kind):
        return "is a symbolic link"
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        return "is a device, fifo or other special file"
    return None


def _write_zip_member(archive: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, destination: Path, real: str) -> None:
    target = destination / info.filename
    # Names are checked already; this catches links that were in `destination` before we started.
    if os.path.commonpath([os.path.realpath(target), real]) != real:
        raise _refused(archive, info.filename, "would be written outside the destination")
    if info.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with zf.open(info) as source, open(target, "wb") as out:
        shutil.copyfileobj(source, out, CHUNK)
    os.chmod(target, 0o755 if (info.external_attr >> 16) & stat.S_IXUSR else 0o644)
