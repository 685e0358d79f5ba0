"""HTML and PNG views of a session."""

import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from halo import HaloConfig, Session
from halo.render import brightness_palette, render_html, write_png

LOG = "".join(f"12:{i:02d} worker <b>{i % 3}</b> & ok\n" for i in range(12))


class Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.spans, self.tags, self.text = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag not in ("br", "meta"):
            self.stack.append(tag)
        if tag == "span":
            self.spans.append(dict(attrs))

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}> (open: {self.stack[-3:]})"
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture
def session(tiny_pair):
    model, tok = tiny_pair
    s = Session(model, tok, HaloConfig(budget=80, sink_tokens=2, recent_tokens=8, chunk_size=8))
    s.feed("You are <terse> & \"quick\".", source="system")
    s.feed(LOG, source="log")
    s.feed("What did </span><script>alert(1)</script> do?")
    s.generate(4)
    mem = s.memory()
    user = [p for p, src in zip(mem.positions.tolist(), mem.sources) if src == "user"]
    s.diffs.append((user[0], 5, 6))
    return s


def test_palette_is_viridis_hex():
    palette = brightness_palette()
    assert len(palette) == 256 and palette[0] == "#440154" and palette[255] == "#fde725"


def test_html_is_well_formed_escaped_and_complete(session, tmp_path):
    path = session.render_html(tmp_path / "m.html")
    page = path.read_text(encoding="utf-8")
    parser = Collector()
    parser.feed(page)
    parser.close()
    assert parser.stack == []
    assert "script" not in parser.tags and "<script>" not in page  # escaped
    assert "&lt;" in page and "&amp;" in page
    assert "http://" not in page and "https://" not in page  # self-contained
    spans = [s for s in parser.spans if "t" in s.get("class", "").split() and not s["title"].startswith("legend")]
    markers = [s for s in spans if "marker" in s["class"]]
    repaired = [s for s in spans if "repaired" in s["class"]]
    assert markers and all("elision marker" in s["title"] for s in markers)
    assert len(repaired) == 1 and "->" in repaired[0]["title"] and "position" in repaired[0]["title"]
    assert len(spans) - len(markers) == sum(1 for src in session.memory().sources if src != "marker")
    assert f"Forgotten: {len(session.journal)} tokens" in page
    assert all("brightness" in s["title"] for s in spans)


def test_png(session, tmp_path):
    path = write_png(session, tmp_path / "m.png", [10, 40, 80, 80])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    write_png(session, tmp_path / "n.png")  # without history


def test_html_renders_in_chromium(session, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no chromium installed")
    path = session.render_html(tmp_path / "m.html")
    result = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", path.as_uri()],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "Remembered" in result.stdout
