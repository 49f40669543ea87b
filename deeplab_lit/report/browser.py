"""The dashboard in a real browser: headless Chromium loads `report.html`, a script checks that every image
decoded (naturalWidth > 0), and a screenshot can be taken. Chromium is optional: `find_chromium()` returns
None where it is not installed (Debian: `apt-get install chromium`), and callers skip.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--no-first-run"]
CHECK = """<script>
window.addEventListener('load', () => {
  const images = Array.from(document.images);
  const broken = images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt || i.src.slice(0, 40));
  const out = document.createElement('pre');
  out.id = 'deeplab-lit-image-check';
  out.textContent = JSON.stringify({images: images.length, broken: broken,
                                    widths: images.map(i => i.naturalWidth)});
  document.body.appendChild(out);
});
</script>"""


def find_chromium() -> Optional[str]:
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _run(chromium: str, arguments: list[str], profile: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}", *arguments], capture_output=True,
                          text=True, timeout=timeout)


def check_images(page: Path, chromium: Optional[str] = None, timeout: float = 120.0) -> dict:
    """Load `page` (a copy with a checking script added) and return {"images": n, "broken": [alt, ...],
    "widths": [naturalWidth, ...]} as the browser saw them."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("no Chromium found (apt-get install chromium)")
    page = Path(page)
    with tempfile.TemporaryDirectory() as scratch:
        copy = page.parent / f".{page.stem}.check.html"  # beside the page: relative links keep working
        text = page.read_text()
        copy.write_text(text.replace("</body>", CHECK + "</body>") if "</body>" in text else text + CHECK)
        try:
            result = _run(chromium, ["--virtual-time-budget=20000", "--dump-dom", copy.resolve().as_uri()],
                          Path(scratch), timeout)
        finally:
            copy.unlink(missing_ok=True)
    found = re.search(r'<pre id="deeplab-lit-image-check">(.*?)</pre>', result.stdout, re.S)
    if not found:
        raise RuntimeError(f"the checking script did not report (chromium exit {result.returncode}): "
                           f"{result.stderr[-500:]}")
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def screenshot(page: Path, out: Path, width: int = 1280, height: int = 2400, chromium: Optional[str] = None,
               timeout: float = 120.0) -> Path:
    """A PNG of the top `height` pixels of `page` rendered `width` pixels wide."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("no Chromium found (apt-get install chromium)")
    out = Path(out).resolve()
    with tempfile.TemporaryDirectory() as scratch:
        result = _run(chromium, [f"--window-size={width},{height}", "--virtual-time-budget=20000",
                                 f"--screenshot={out}", Path(page).resolve().as_uri()], Path(scratch), timeout)
    if not out.is_file():
        raise RuntimeError(f"chromium wrote no screenshot (exit {result.returncode}): {result.stderr[-500:]}")
    return out
