"""Resumable, md5-checked download and atomic extraction of the dataset archives.

torchvision's `download_url` restarts from zero after an interruption, which hurts for VOC (2 GB)
and SBD (1.4 GB) on slow mirrors, so the transfer itself is a small HTTP Range loop; the md5
(`calculate_md5`) and the extraction (`extract_archive`) are torchvision's.
"""
from __future__ import annotations

import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from torchvision.datasets.utils import calculate_md5, extract_archive

from deeplab_lit.errors import UserError

CHUNK = 1 << 20


def download(url: str, path: Path, md5: str, *, log=print) -> Path:
    """Download `url` to `path` and check its md5.

    Bytes arrive in `<path>.part`; a later call resumes from its size with an HTTP Range request
    (a server that ignores Range answers 200 and the file restarts). The finished file is renamed
    to `path` only if its md5 matches; otherwise it is deleted and UserError says so. An existing
    `path` with the right md5 is kept without any network access.
    """
    path = Path(path)
    if path.is_file():
        if calculate_md5(path) == md5:
            return path
        log(f"{path} has the wrong md5; deleting it and downloading again")
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
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
    actual = calculate_md5(part)
    if actual != md5:
        part.unlink()
        raise UserError(
            f"{url} has md5 {actual}, expected {md5}: the archive is corrupt or not the official one, "
            "so it was deleted; run again or check the URL"
        )
    part.replace(path)
    return path


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
