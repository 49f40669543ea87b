"""The download path of `prepare voc` / `prepare sbd` against a local HTTP server on 127.0.0.1
serving archives the test builds: md5 check, rejection and deletion, resume, extraction."""
from __future__ import annotations

import hashlib
import http.server
import re
import socket
import tarfile
import threading
from pathlib import Path

import pytest

from deeplab_lit.errors import UserError
from datamodules.download import download
from datamodules.prepare import main as prepare_main
from datamodules.prepare import SBD_URL, VOC_URL, prepare_sbd, prepare_voc
from test_data_trees import write_sbd_tree, write_voc_tree

VOC_TRAIN, VOC_VAL = ["2007_000032", "2007_000039"], ["2007_000033"]
SBD_TRAIN, SBD_VAL = ["2007_000032", "2008_000002", "2008_000003"], ["2007_000033", "2008_000004"]


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with HTTP Range support (http.server has none); records what it was asked."""

    requests: list = []

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        type(self).requests.append((self.path, self.headers.get("Range")))
        if not path.is_file() or not match or not self.server.ranges:
            return super().do_GET()
        data = path.read_bytes()
        start = int(match.group(1))
        if start >= len(data):
            self.send_response(416)
            self.end_headers()
            return
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """(base URL, served directory, server). Archives put in the directory are downloadable."""
    served = tmp_path / "served"
    served.mkdir()
    RangeHandler.requests = []
    handler = lambda *a, **k: RangeHandler(*a, directory=str(served), **k)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.ranges = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", served, httpd
    httpd.shutdown()
    httpd.server_close()


def make_archives(tmp_path: Path, served: Path) -> dict[str, str]:
    """VOCtrainval_11-May-2012.tar and benchmark.tgz with the real top-level layout; name -> md5."""
    source = tmp_path / "source"
    write_voc_tree(source, VOC_TRAIN, VOC_VAL, extra_images=["2008_000002", "2008_000003", "2008_000004"])
    write_sbd_tree(source, SBD_TRAIN, SBD_VAL)
    with tarfile.open(served / "VOCtrainval_11-May-2012.tar", "w") as tar:
        tar.add(source / "VOCdevkit", arcname="VOCdevkit")
    with tarfile.open(served / "benchmark.tgz", "w:gz") as tar:
        tar.add(source / "benchmark_RELEASE", arcname="benchmark_RELEASE")
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in served.iterdir()}


def test_prepare_downloads_checks_md5_and_extracts(tmp_path, server, capsys):
    url, served, _ = server
    md5 = make_archives(tmp_path, served)
    root = tmp_path / "root"
    voc_url = f"{url}/VOCtrainval_11-May-2012.tar"
    sbd_url = f"{url}/benchmark.tgz"
    assert prepare_main(["voc", "--root", str(root), "--url", voc_url, "--md5", md5["VOCtrainval_11-May-2012.tar"]]) == 0
    assert prepare_main(["sbd", "--root", str(root), "--url", sbd_url, "--md5", md5["benchmark.tgz"]]) == 0
    out = capsys.readouterr().out
    assert "train 2 (official: 1,464), val 1 (official: 1,449)" in out
    assert "train_aug 5 (official: 10,582)" in out  # {032, 039} | {032, 002, 003} | {033, 004} - {033}
    assert (root / "VOCdevkit/VOC2012/ImageSets/Segmentation/train_aug.txt").read_text().split() == [
        "2007_000032", "2007_000039", "2008_000002", "2008_000003", "2008_000004"
    ]  # fmt: skip
    # Archives are deleted after extraction, and nothing temporary is left behind.
    assert sorted(p.name for p in root.iterdir()) == ["VOCdevkit", "benchmark_RELEASE"]
    assert RangeHandler.requests == [("/VOCtrainval_11-May-2012.tar", None), ("/benchmark.tgz", None)]

    # A root that holds the extracted trees is used as it is: no further request.
    assert prepare_main(["voc", "--root", str(root), "--url", voc_url]) == 0
    assert prepare_main(["sbd", "--root", str(root), "--url", sbd_url]) == 0
    assert len(RangeHandler.requests) == 2


def test_wrong_md5_is_rejected_and_deleted(tmp_path, server, capsys):
    url, served, _ = server
    make_archives(tmp_path, served)
    root = tmp_path / "root"
    wrong = "0" * 32
    code = prepare_main(["voc", "--root", str(root), "--url", f"{url}/VOCtrainval_11-May-2012.tar", "--md5", wrong])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert re.fullmatch(
        rf"error: {url}/VOCtrainval_11-May-2012.tar has md5 [0-9a-f]{{32}}, expected {wrong}: the archive is "
        r"corrupt or not the official one, so it was deleted; run again or check the URL\n", err
    )  # fmt: skip
    assert list(root.iterdir()) == []  # neither the archive, nor a .part, nor an extracted tree


def test_download_resumes_with_a_range_request(tmp_path, server):
    url, served, _ = server
    md5 = make_archives(tmp_path, served)
    archive = (served / "benchmark.tgz").read_bytes()
    target = tmp_path / "dl" / "benchmark.tgz"
    target.parent.mkdir()
    (target.parent / "benchmark.tgz.part").write_bytes(archive[:1000])  # an interrupted download
    download(f"{url}/benchmark.tgz", target, md5["benchmark.tgz"], log=lambda *_: None)
    assert target.read_bytes() == archive
    assert RangeHandler.requests == [("/benchmark.tgz", "bytes=1000-")]
    assert not (target.parent / "benchmark.tgz.part").exists()
    # Already complete with the right md5: no request at all.
    download(f"{url}/benchmark.tgz", target, md5["benchmark.tgz"], log=lambda *_: None)
    assert len(RangeHandler.requests) == 1


def test_server_without_range_support_restarts_from_zero(tmp_path, server):
    url, served, httpd = server
    httpd.ranges = False
    md5 = make_archives(tmp_path, served)
    target = tmp_path / "benchmark.tgz"
    (tmp_path / "benchmark.tgz.part").write_bytes(b"stale bytes from another file")
    messages = []
    download(f"{url}/benchmark.tgz", target, md5["benchmark.tgz"], log=messages.append)
    assert target.read_bytes() == (served / "benchmark.tgz").read_bytes()
    assert any("does not resume; starting again" in m for m in messages)


def test_existing_archive_with_wrong_md5_is_replaced(tmp_path, server):
    url, served, _ = server
    md5 = make_archives(tmp_path, served)
    target = tmp_path / "benchmark.tgz"
    target.write_bytes(b"corrupt")
    download(f"{url}/benchmark.tgz", target, md5["benchmark.tgz"], log=lambda *_: None)
    assert hashlib.md5(target.read_bytes()).hexdigest() == md5["benchmark.tgz"]


def test_http_error_and_unreachable_server(tmp_path, server):
    url, _, _ = server
    with pytest.raises(UserError, match=rf"downloading {url}/missing.tar failed: HTTP 404"):
        download(f"{url}/missing.tar", tmp_path / "missing.tar", "0" * 32, log=lambda *_: None)
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(UserError, match=r"failed \(.*\); run the same command again to resume"):
        prepare_voc(tmp_path / "root", url=f"http://127.0.0.1:{port}/VOCtrainval_11-May-2012.tar")


def test_archive_without_the_expected_tree(tmp_path, server):
    url, served, _ = server
    with tarfile.open(served / "benchmark.tgz", "w:gz") as tar:
        (tmp_path / "other").mkdir()
        tar.add(tmp_path / "other", arcname="other")
    md5 = hashlib.md5((served / "benchmark.tgz").read_bytes()).hexdigest()
    root = tmp_path / "root"
    write_voc_tree(root, VOC_TRAIN, VOC_VAL)
    with pytest.raises(UserError, match=r"benchmark.tgz does not contain benchmark_RELEASE/; is it the right archive"):
        prepare_sbd(root, url=f"{url}/benchmark.tgz", md5=md5)
    assert sorted(p.name for p in root.iterdir()) == ["VOCdevkit", "benchmark.tgz"]  # no half tree


def test_file_url_is_a_local_mirror(tmp_path, capsys):
    """--url file:///... copies the archive (the mirror keeps it), checks the md5 and extracts."""
    mirror = tmp_path / "local mirror"  # a space: the URL is percent-encoded
    mirror.mkdir()
    md5 = make_archives(tmp_path, mirror)
    source = mirror / "VOCtrainval_11-May-2012.tar"
    root = tmp_path / "root"
    url = source.as_uri()
    assert "%20" in url
    assert prepare_main(["voc", "--root", str(root), "--url", url, "--md5", md5["VOCtrainval_11-May-2012.tar"]]) == 0
    out = capsys.readouterr().out
    assert f"copying {source} -> {root / 'VOCtrainval_11-May-2012.tar'}" in out
    assert "train 2 (official: 1,464), val 1 (official: 1,449)" in out
    assert sorted(p.name for p in root.iterdir()) == ["VOCdevkit"]  # the copy is deleted after extraction
    assert hashlib.md5(source.read_bytes()).hexdigest() == md5["VOCtrainval_11-May-2012.tar"]  # the mirror is intact
    # file://localhost/... names the same file.
    target = tmp_path / "dl" / "benchmark.tgz"
    localhost_url = "file://localhost" + str(mirror / "benchmark.tgz").replace(" ", "%20")
    download(localhost_url, target, md5["benchmark.tgz"], log=lambda *_: None)
    assert target.read_bytes() == (mirror / "benchmark.tgz").read_bytes()


def test_file_url_with_the_wrong_md5_deletes_only_the_copy(tmp_path, capsys):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    make_archives(tmp_path, mirror)
    source = mirror / "VOCtrainval_11-May-2012.tar"
    before = source.read_bytes()
    root = tmp_path / "root"
    wrong = "0" * 32
    assert prepare_main(["voc", "--root", str(root), "--url", source.as_uri(), "--md5", wrong]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(
        rf"error: {re.escape(source.as_uri())} has md5 [0-9a-f]{{32}}, expected {wrong}: the archive is corrupt or "
        r"not the official one, so its copy was deleted; run again or check the URL\n", err
    )  # fmt: skip
    assert list(root.iterdir()) == []
    assert source.read_bytes() == before


@pytest.mark.parametrize("url, message", [
    ("file:///MISSING/VOCtrainval_11-May-2012.tar",
     "the local archive /MISSING/VOCtrainval_11-May-2012.tar (from file:///MISSING/VOCtrainval_11-May-2012.tar) "
     "does not exist or is not a file; check --url"),
    ("file://mirror.example.org/VOCtrainval_11-May-2012.tar",
     "file://mirror.example.org/VOCtrainval_11-May-2012.tar is not a local file URL; "
     "write file:///absolute/path/to/the/archive"),
    ("ftp://mirror.example.org/VOCtrainval_11-May-2012.tar",
     "the URL ftp://mirror.example.org/VOCtrainval_11-May-2012.tar has the unsupported scheme ftp:; "
     "use http://, https:// or file:///absolute/path"),
    ("s3://bucket/VOCtrainval_11-May-2012.tar",
     "the URL s3://bucket/VOCtrainval_11-May-2012.tar has the unsupported scheme s3:; "
     "use http://, https:// or file:///absolute/path"),
    ("host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
     "the URL host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar has no scheme; "
     "use http://, https:// or file:///absolute/path"),
])  # fmt: skip
def test_unsupported_urls_are_one_line_and_touch_nothing(tmp_path, capsys, url, message):
    url = url.replace("/MISSING", str(tmp_path / "missing"))
    message = message.replace("/MISSING", str(tmp_path / "missing"))
    root = tmp_path / "root"
    assert prepare_main(["voc", "--root", str(root), "--url", url, "--md5", "0" * 32]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not root.exists()


def test_a_bare_local_path_is_refused_with_its_file_url(tmp_path, capsys, monkeypatch):
    """A bare path is not guessed to be a file (a URL missing its https:// must not become a file
    lookup), but when it names an existing file the error spells out the file:// URL to use."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    make_archives(tmp_path, mirror)
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "root"
    assert prepare_main(["voc", "--root", str(root), "--url", "mirror/VOCtrainval_11-May-2012.tar"]) == 2
    assert capsys.readouterr().err == (
        "error: the URL mirror/VOCtrainval_11-May-2012.tar has no scheme; use http://, https:// or "
        f"file:///absolute/path (for this local file: {(mirror / 'VOCtrainval_11-May-2012.tar').as_uri()})\n"
    )
    assert not root.exists()


def test_official_urls_use_https():
    assert [url.split("://")[0] for url in (VOC_URL, SBD_URL)] == ["https", "https"]
