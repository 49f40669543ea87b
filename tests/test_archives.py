"""Archives are data from someone else, never code: `safe_extract` and `prepare voc/sbd` refuse
members that would write outside the root, links out of the tree and device files, never restore
setuid bits, and leave no half tree behind. Every archive is built here with tarfile/zipfile."""
from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from deeplab_lit.errors import UserError
from datamodules.download import extract_tree, safe_extract
from datamodules.prepare import main as prepare_main
from test_data_download import VOC_TRAIN, VOC_VAL
from test_data_trees import write_voc_tree

VOC_ARCHIVE = "VOCtrainval_11-May-2012.tar"
ADVICE = "the archive is not the official one, delete it or check --url"


def tar_member(name: str, data: bytes = b"", **fields) -> tuple[tarfile.TarInfo, bytes | None]:
    """A tar member: a regular file holding `data` unless `fields` say otherwise (type, linkname, mode)."""
    info = tarfile.TarInfo(name)
    info.size = len(data) if fields.get("type", tarfile.REGTYPE) == tarfile.REGTYPE else 0
    info.mode = 0o644
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data if info.isreg() else None


def write_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w", *, tree=None) -> str:
    """Write the directory `tree` (if any) then `members`, in order, to the tar `path`; return its md5."""
    with tarfile.open(path, mode) as tar:
        if tree is not None:
            tar.add(tree, arcname=tree.name)
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return hashlib.md5(path.read_bytes()).hexdigest()


def zip_member(name: str, data: bytes = b"", mode: int = stat.S_IFREG | 0o644) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # unix: external_attr's high 16 bits are st_mode
    info.external_attr = mode << 16
    return info, data


def write_zip(path: Path, members: list[tuple[zipfile.ZipInfo, bytes]]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for info, data in members:
            zf.writestr(info, data)


def legit_members() -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """A few ordinary members first, so a refusal must also discard what came before it."""
    return [
        tar_member("VOCdevkit", type=tarfile.DIRTYPE, mode=0o755),
        tar_member("VOCdevkit/VOC2012", type=tarfile.DIRTYPE, mode=0o755),
        tar_member("VOCdevkit/VOC2012/readme.txt", b"official-looking"),
    ]


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# Each case: the hostile members (appended after legit_members()), the index of the one refused,
# the sentinel path it aims at (relative to tmp_path; the root is tmp_path/root, its scratch
# directory tmp_path/root/.extract-XXXX) and the exact reason given.
HOSTILE_TAR = {
    "dotdot": (lambda tmp: [tar_member("../../evil", b"owned")], 0, "evil", "has a '..' component"),
    "nested-dotdot": (lambda tmp: [tar_member("VOCdevkit/../../../evil", b"owned")], 0, "evil", "has a '..' component"),
    # The data filter alone would strip the leading "/" and write <scratch>/<tmp_path>/evil inside the
    # root; the archive is refused outright instead, before anything is written.
    "absolute": (lambda tmp: [tar_member(str(tmp / "evil"), b"owned")], 0, "evil", "has an absolute path"),
    "symlink-absolute": (
        lambda tmp: [
            tar_member("VOCdevkit/link", type=tarfile.SYMTYPE, linkname=str(tmp / "outside")),
            tar_member("VOCdevkit/link/evil", b"owned"),
        ],
        0, "outside/evil", "is a link whose target has an absolute path",
    ),
    "symlink-relative": (
        lambda tmp: [
            tar_member("VOCdevkit/link", type=tarfile.SYMTYPE, linkname="../../../outside"),
            tar_member("VOCdevkit/link/evil", b"owned"),
        ],
        0, "outside/evil", "is a link whose target has a '..' component",
    ),
    # Each link looks harmless on paper (read as a directory, x/.. is the scratch directory), but x
    # is a link to ".", so y is made in the scratch directory itself and ".." leads into the root.
    "symlink-chain": (
        lambda tmp: [
            tar_member("x", type=tarfile.SYMTYPE, linkname="."),
            tar_member("x/y", type=tarfile.SYMTYPE, linkname=".."),
            tar_member("x/y/evil", b"owned"),
        ],
        1, "root/evil", "is a link whose target has a '..' component",
    ),
    "hardlink": (
        lambda tmp: [tar_member("VOCdevkit/passwd", type=tarfile.LNKTYPE, linkname="../../outside/target")],
        0, "outside/evil", "is a link whose target has a '..' component",
    ),
    "empty-name-symlink": (
        lambda tmp: [tar_member("", type=tarfile.SYMTYPE, linkname="VOCdevkit")],
        0, "evil", "has no name of its own (it would replace the destination)",
    ),
    "char-device": (
        lambda tmp: [tar_member("VOCdevkit/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3)],
        0, "evil", "is a device, fifo or other special file",
    ),
    "fifo": (
        lambda tmp: [tar_member("VOCdevkit/pipe", type=tarfile.FIFOTYPE)],
        0, "evil", "is a device, fifo or other special file",
    ),
}


@pytest.mark.parametrize("kind", list(HOSTILE_TAR))
@pytest.mark.parametrize("dataset", ["voc", "sbd"])
def test_prepare_refuses_a_hostile_tar_and_leaves_nothing(tmp_path, capsys, kind, dataset):
    members, refused, sentinel, reason = HOSTILE_TAR[kind]
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside/target").write_text("not yours")
    hostile = members(tmp_path)
    root = tmp_path / "root"
    before = []
    if dataset == "sbd":  # sbd extracts next to an existing VOC tree, which must come out untouched
        write_voc_tree(root, VOC_TRAIN, VOC_VAL)
        before = files_under(root)
    archive = VOC_ARCHIVE if dataset == "voc" else "benchmark.tgz"
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    md5 = write_tar(mirror / archive, legit_members() + hostile, "w:gz" if dataset == "sbd" else "w")

    code = prepare_main([dataset, "--root", str(root), "--url", (mirror / archive).as_uri(), "--md5", md5])

    assert code == 2
    err = capsys.readouterr().err
    name = hostile[refused][0].name
    assert err == f"error: refused to extract {root / archive}: member {name!r} {reason}; {ADVICE}\n"
    assert not (tmp_path / sentinel).exists()
    assert (tmp_path / "outside/target").read_text() == "not yours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mirror", "outside", "root"]
    # The downloaded archive is kept (its md5 is the one asked for; the message says to delete it),
    # and nothing else: no VOCdevkit from the refused archive, no .extract-* scratch directory.
    assert files_under(root) == sorted(before + [archive])


def test_hostile_tar_is_refused_before_anything_is_written(tmp_path):
    archive = tmp_path / "a.tar"
    write_tar(archive, legit_members() + [tar_member("../evil", b"owned")])
    destination = tmp_path / "out"
    destination.mkdir()
    with pytest.raises(UserError, match=re.escape(f"refused to extract {archive}: member '../evil' has a '..' component")):
        safe_extract(archive, destination)
    assert list(destination.iterdir()) == []
    assert not (tmp_path / "evil").exists()


def test_tar_links_may_only_point_down_even_inside_the_tree(tmp_path):
    archive = tmp_path / "a.tar"
    write_tar(archive, [tar_member("top/a.txt", b"ay"), tar_member("top/sub/up", type=tarfile.SYMTYPE, linkname="../a.txt")])
    with pytest.raises(UserError) as caught:
        safe_extract(archive, tmp_path / "out")
    assert str(caught.value) == (
        f"refused to extract {archive}: member 'top/sub/up' is a link whose target has a '..' component; {ADVICE}"
    )
    assert not (tmp_path / "out").exists()


def test_tar_is_not_written_through_a_link_already_in_the_destination(tmp_path):
    archive = tmp_path / "a.tar"
    write_tar(archive, [tar_member("d/x", b"owned")])
    destination = tmp_path / "out"
    destination.mkdir()
    (tmp_path / "outside").mkdir()
    (destination / "d").symlink_to(tmp_path / "outside")
    with pytest.raises(UserError, match=re.escape("member 'd/x' would be written outside the destination")):
        safe_extract(archive, destination)
    assert list((tmp_path / "outside").iterdir()) == []


def test_the_data_filter_during_extraction_is_a_second_line(tmp_path, monkeypatch):
    """With the first pass switched off, tarfile's data filter still refuses, with the same message."""
    monkeypatch.setattr("datamodules.download._check_tar_member", lambda *args: None)
    archive = tmp_path / "a.tar"
    write_tar(archive, [
        tar_member("top/ok.txt", b"fine"),
        tar_member("top/link", type=tarfile.SYMTYPE, linkname=str(tmp_path / "outside")),
        tar_member("top/link/evil", b"owned"),
    ])  # fmt: skip
    (tmp_path / "outside").mkdir()
    with pytest.raises(UserError) as caught:
        safe_extract(archive, tmp_path / "out")
    assert str(caught.value) == f"refused to extract {archive}: member 'top/link' is a link to an absolute path; {ADVICE}"
    assert list((tmp_path / "outside").iterdir()) == []
    assert files_under(tmp_path / "out") == ["top", "top/ok.txt"]  # written before the refusal, inside


def test_tar_setuid_and_group_write_bits_are_stripped(tmp_path):
    """A setuid member is not refused (the data filter sanitises it): it is written 0o755."""
    source = tmp_path / "source"
    write_voc_tree(source, VOC_TRAIN, VOC_VAL)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    modes = {"VOCdevkit/suid": 0o4755, "VOCdevkit/sgid": 0o2775, "VOCdevkit/sticky": 0o1666}
    members = [tar_member(name, b"#!/bin/sh\n", mode=mode) for name, mode in modes.items()]
    md5 = write_tar(mirror / VOC_ARCHIVE, members, tree=source / "VOCdevkit")
    root = tmp_path / "root"
    assert prepare_main(["voc", "--root", str(root), "--url", (mirror / VOC_ARCHIVE).as_uri(), "--md5", md5]) == 0
    modes = {name: stat.S_IMODE((root / "VOCdevkit" / name).stat().st_mode) for name in ("suid", "sgid", "sticky")}
    assert modes == {"suid": 0o755, "sgid": 0o755, "sticky": 0o644}


def test_legitimate_tar_extracts_with_downward_symlinks_and_a_hardlink(tmp_path):
    archive = tmp_path / "a.tar.xz"
    write_tar(archive, [
        tar_member("top", type=tarfile.DIRTYPE, mode=0o755),
        tar_member("top/sub", type=tarfile.DIRTYPE, mode=0o755),
        tar_member("top/sub/b.txt", b"bee"),
        tar_member("top/a.txt", b"ay", mode=0o600),
        tar_member("top/link", type=tarfile.SYMTYPE, linkname="sub/b.txt"),
        tar_member("top/alias", type=tarfile.SYMTYPE, linkname="./sub"),
        tar_member("top/hard", type=tarfile.LNKTYPE, linkname="top/a.txt", mode=0o600),  # same inode, same mode
    ], "w:xz")  # fmt: skip
    destination = tmp_path / "out"
    safe_extract(archive, destination)
    top = destination / "top"
    assert files_under(destination) == [
        "top", "top/a.txt", "top/alias", "top/hard", "top/link", "top/sub", "top/sub/b.txt"
    ]  # fmt: skip (rglob does not enter the linked directory top/alias)
    assert (top / "a.txt").read_bytes() == b"ay" and (top / "sub/b.txt").read_bytes() == b"bee"
    assert os.readlink(top / "link") == "sub/b.txt" and (top / "link").read_bytes() == b"bee"
    assert os.readlink(top / "alias") == "./sub" and (top / "alias/b.txt").read_bytes() == b"bee"
    assert (top / "hard").stat().st_ino == (top / "a.txt").stat().st_ino
    assert stat.S_IMODE((top / "a.txt").stat().st_mode) == 0o600


def test_extract_tree_moves_the_member_and_leaves_no_scratch(tmp_path):
    archive = tmp_path / "a.tgz"
    write_tar(archive, [tar_member("top/x.txt", b"x"), tar_member("other.txt", b"o")], "w:gz")
    root = tmp_path / "root"
    assert extract_tree(archive, root, "top") == root / "top"
    assert files_under(root) == ["top", "top/x.txt"]


def test_extract_tree_refuses_a_top_level_symlink(tmp_path):
    """`member` as a link inside the archive would be moved as a link and read elsewhere in root."""
    archive = tmp_path / "a.tar"
    write_tar(archive, [tar_member("real/x.txt", b"x"), tar_member("top", type=tarfile.SYMTYPE, linkname="real")])
    root = tmp_path / "root"
    with pytest.raises(UserError, match=re.escape(f"{archive} does not contain top/; is it the right archive?")):
        extract_tree(archive, root, "top")
    assert list(root.iterdir()) == []


def test_extract_tree_over_an_incomplete_tree_is_one_line(tmp_path):
    archive = tmp_path / "a.tar"
    write_tar(archive, [tar_member("top/x.txt", b"x")])
    root = tmp_path / "root"
    (root / "top").mkdir(parents=True)
    (root / "top/stale").write_text("")
    expected = f"{root / 'top'} already exists but is incomplete; delete it and run again"
    with pytest.raises(UserError, match=re.escape(expected)):
        extract_tree(archive, root, "top")
    assert files_under(root) == ["top", "top/stale"]
    (root / "top/stale").unlink()  # an empty directory is replaced
    assert extract_tree(archive, root, "top") == root / "top"
    assert files_under(root) == ["top", "top/x.txt"]


@pytest.mark.parametrize("name, reason", [
    ("../evil", "has a '..' component"),
    ("a/../../evil", "has a '..' component"),
    ("a\\..\\..\\evil", "has a '..' component"),
    ("/ABSOLUTE/evil", "has an absolute path"),
    ("\\evil", "has an absolute path"),
    ("C:/evil", "starts with a drive letter"),
    ("c:evil", "starts with a drive letter"),
])  # fmt: skip
def test_zip_refuses_names_that_escape(tmp_path, name, reason):
    name = name.replace("/ABSOLUTE", str(tmp_path))
    archive = tmp_path / "a.zip"
    write_zip(archive, [zip_member("top/ok.txt", b"fine"), zip_member(name, b"owned")])
    destination = tmp_path / "out"
    with pytest.raises(UserError) as caught:
        safe_extract(archive, destination)
    assert str(caught.value) == f"refused to extract {archive}: member {name!r} {reason}; {ADVICE}"
    assert not destination.exists()  # checked before anything is written, even the first member
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip"]


@pytest.mark.parametrize("mode, reason", [
    (stat.S_IFLNK | 0o777, "is a symbolic link"),
    (stat.S_IFCHR | 0o666, "is a device, fifo or other special file"),
    (stat.S_IFBLK | 0o666, "is a device, fifo or other special file"),
    (stat.S_IFIFO | 0o644, "is a device, fifo or other special file"),
    (stat.S_IFSOCK | 0o644, "is a device, fifo or other special file"),
])  # fmt: skip
def test_zip_refuses_links_and_special_files(tmp_path, mode, reason):
    archive = tmp_path / "a.zip"
    # A symlink entry holds its target as data; then a file written "through" it.
    link = zip_member("top/link", str(tmp_path / "outside").encode(), mode)
    write_zip(archive, [link, zip_member("top/link/evil", b"owned")])
    (tmp_path / "outside").mkdir()
    destination = tmp_path / "out"
    with pytest.raises(UserError) as caught:
        safe_extract(archive, destination)
    assert str(caught.value) == f"refused to extract {archive}: member 'top/link' {reason}; {ADVICE}"
    assert not destination.exists()
    assert list((tmp_path / "outside").iterdir()) == []


def test_legitimate_zip_extracts_without_setuid_bits(tmp_path):
    archive = tmp_path / "a.zip"
    write_zip(archive, [
        zip_member("top/", mode=stat.S_IFDIR | 0o755),
        zip_member("top/a.txt", b"ay", stat.S_IFREG | 0o666),
        zip_member("top/sub/suid", b"#!/bin/sh\n", stat.S_IFREG | 0o4755),
        zip_member("top/sub/sgid", b"x", stat.S_IFREG | 0o2644),
        zip_member("top/dos.txt", b"made on windows", 0),  # no unix mode: a plain file
    ])  # fmt: skip
    destination = tmp_path / "out"
    safe_extract(archive, destination)
    assert files_under(destination) == ["top", "top/a.txt", "top/dos.txt", "top/sub", "top/sub/sgid", "top/sub/suid"]
    assert (destination / "top/a.txt").read_bytes() == b"ay"
    assert (destination / "top/dos.txt").read_bytes() == b"made on windows"
    names = ("a.txt", "dos.txt", "sub/suid", "sub/sgid")
    modes = {n: stat.S_IMODE((destination / "top" / n).stat().st_mode) for n in names}
    assert modes == {"a.txt": 0o644, "dos.txt": 0o644, "sub/suid": 0o755, "sub/sgid": 0o644}


def test_zip_does_not_write_through_a_link_already_in_the_destination(tmp_path):
    archive = tmp_path / "a.zip"
    write_zip(archive, [zip_member("d/x", b"owned")])
    destination = tmp_path / "out"
    destination.mkdir()
    (tmp_path / "outside").mkdir()
    (destination / "d").symlink_to(tmp_path / "outside")
    with pytest.raises(UserError, match=re.escape("member 'd/x' would be written outside the destination")):
        safe_extract(archive, destination)
    assert list((tmp_path / "outside").iterdir()) == []


@pytest.mark.parametrize("name, damage", [
    ("a.tar.gz", lambda data: data[: len(data) // 2]),  # truncated download
    ("a.tar", lambda data: b"this is not an archive" * 100),
    ("a.zip", lambda data: data[: len(data) - 30]),  # the central directory is cut off
    ("a.zip", lambda data: b"PK\x03\x04 not really"),
])  # fmt: skip
def test_damaged_archives_are_one_line_errors(tmp_path, name, damage):
    archive = tmp_path / name
    if name.endswith(".zip"):
        write_zip(archive, [zip_member("top/x.bin", os.urandom(4096))])
    else:
        write_tar(archive, [tar_member("top/x.bin", os.urandom(64 * 1024))], "w:gz" if name.endswith(".gz") else "w")
    archive.write_bytes(damage(archive.read_bytes()))
    root = tmp_path / "root"
    with pytest.raises(UserError) as caught:
        extract_tree(archive, root, "top")
    message = str(caught.value)
    assert "\n" not in message
    assert re.fullmatch(rf"cannot extract {re.escape(str(archive))} \(.+\); delete it and run again", message)
    assert list(root.iterdir()) == []


def test_python_without_the_tar_data_filter_is_refused(tmp_path, monkeypatch):
    archive = tmp_path / "a.tar"
    write_tar(archive, [tar_member("top/x.txt", b"x")])
    monkeypatch.delattr(tarfile, "data_filter")
    monkeypatch.setattr("platform.python_version", lambda: "3.11.2")
    with pytest.raises(UserError) as caught:
        safe_extract(archive, tmp_path / "out")
    assert str(caught.value) == (
        f"extracting {archive} safely needs tarfile's data filter, new in Python 3.11.4; "
        "this is Python 3.11.2: upgrade to Python 3.11.4 or newer"
    )
    assert not (tmp_path / "out").exists()
