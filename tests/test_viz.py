"""pyquant.viz: the figures are real PNGs, the page is self-contained, and headless Chromium renders it
with every figure loaded and something on the screen."""
from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("matplotlib", reason="pyquant.viz needs matplotlib: pip install matplotlib")

from pyquant.analysis import analyze
from pyquant.viz import figures, plots, render_html, write_report
from spec_tiny import tiny_data, tiny_model
from helpers import one_thread  # noqa: F401  (fixture)

PNG = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def analysis():
    data = tiny_data()
    return analyze(tiny_model(), data[:1], data)


def _png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == PNG
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def test_figures_are_pngs(analysis):
    figs = figures(analysis)
    assert set(figs) == {"sensitivity", "layer_sqnr", "weight_spread", "channel_ranges", "histograms"}
    for name, png in figs.items():
        w, h = _png_size(png)
        assert w >= 400 and h >= 200, name
    with pytest.raises(KeyError, match="no layer"):
        plots.channel_ranges(analysis["weight_ranges"], "nope")


def test_page_is_self_contained(analysis, tmp_path):
    page = write_report(analysis, tmp_path / "r" / "report.html", png_dir=tmp_path / "png")
    text = page.read_text()
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == sorted(f"{k}.png" for k in figures(analysis))
    assert not [p for p in page.parent.iterdir() if p.name.endswith(".tmp")]  # atomic: no leftovers
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', text)
    assert len(srcs) == 5
    for s in srcs:
        assert s.startswith("data:image/png;base64,")
        _png_size(base64.b64decode(s.split(",", 1)[1]))
    assert "<script" not in text and "http://" not in text and "https://" not in text
    assert "<link" not in text and "@import" not in text
    top3 = analysis["sensitivity"]["ranking"][:3]
    assert ", ".join(top3) in text
    # a page without the optional parts still renders
    minimal = render_html({k: v for k, v in analysis.items() if k in ("model", "simulation", "layer_sqnr")})
    assert minimal.count("<img") == 1


def test_missing_matplotlib_says_what_to_install(monkeypatch):
    from pyquant.viz import _mpl
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        _mpl.figure()


_CHECK = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var r = {n: imgs.length, ok: imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length,
           widths: imgs.map(function (i) { return i.naturalWidth; }),
           textLength: document.body.innerText.length, height: document.body.scrollHeight};
  var pre = document.createElement('pre'); pre.id = 'pq-check'; pre.textContent = JSON.stringify(r);
  document.body.appendChild(pre);
});
</script>"""


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _run_chromium(exe: str, tmp_path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}"]
    return subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=120)


def test_report_renders_in_headless_chromium(analysis, tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("headless check needs Debian's chromium: apt-get install chromium (make assets does it as root)")
    page = write_report(analysis, tmp_path / "report.html")
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", _CHECK + "</body>"))
    dom = _run_chromium(exe, tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    m = re.search(r'<pre id="pq-check">(.*?)</pre>', dom.stdout)
    assert m, f"no check result in the DOM (rc {dom.returncode}): {dom.stderr[-2000:]}"
    r = json.loads(m.group(1).replace("&quot;", '"'))
    assert r["n"] == 5 and r["ok"] == r["n"], r  # every figure decoded (naturalWidth > 0)
    assert all(w >= 400 for w in r["widths"]), r
    assert r["textLength"] > 500 and r["height"] > 1500, r

    shot = tmp_path / "shot.png"
    res = _run_chromium(exe, tmp_path, "--window-size=1100,1400", f"--screenshot={shot}", page.as_uri())
    assert shot.exists(), f"no screenshot (rc {res.returncode}): {res.stderr[-2000:]}"
    from matplotlib import image
    px = image.imread(str(shot))[..., :3]
    assert px.shape[0] == 1400 and px.shape[1] == 1100
    ink = (px.mean(axis=2) < 0.9).mean()  # share of pixels that are not (near) white
    assert ink > 0.05 and px.std() > 0.05, (ink, px.std())
