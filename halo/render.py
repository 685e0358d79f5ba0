"""Views of a Session: a self-contained HTML page (memory coloured by brightness + the journal) and a PNG.

The HTML page has no external resources: inline CSS, no scripts. Each remembered token is a <span> whose
background is the viridis colour of its brightness (0-255) and whose title gives position, source, brightness
and, for repaired tokens, `old -> new`. Elision markers and repaired tokens are outlined. With per-layer memory
(granularity "layer") the title also says how many layers hold the token (per-head memory: how many KV heads of
all layers), and a token held by fewer than all of them is drawn fainter (opacity from 0.35 for one to 1 for
all). All text is escaped.
"""

from __future__ import annotations

import html
from pathlib import Path

from .atomic import atomic_write_bytes

JOURNAL_ROWS = 5000  # most journal rows shown in the page (the newest are kept)


def brightness_palette(cmap: str = "viridis") -> list[str]:
    """256 '#rrggbb' colours of a perceptual colour map, index = brightness."""
    import matplotlib

    colormap = matplotlib.colormaps[cmap]
    out = []
    for i in range(256):
        r, g, b, _ = colormap(i / 255.0)
        out.append(f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}")
    return out


def _ink(hex_colour: str) -> str:
    r, g, b = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#fff"


def _level(b: float) -> int:
    if b != b:  # NaN
        return 0
    return max(0, min(255, int(round(b))))


def _token_text(tokenizer, token_id: int) -> str:
    if token_id < 0:
        return "\N{REPLACEMENT CHARACTER}"
    return tokenizer.decode([token_id])


def _visible(text: str) -> str:
    """Escaped token text; newlines kept as line breaks, other control characters shown as escapes."""
    shown = "".join(c if c in "\n\t" or c.isprintable() else repr(c)[1:-1] for c in text)
    return html.escape(shown).replace("\n", "\u21b5<br>")


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#111}
h1{font-size:1.3em} h2{font-size:1.1em;margin-top:1.5em}
.stats{font-size:.9em;color:#333}
.memory{font-family:ui-monospace,monospace;font-size:13px;line-height:1.9;background:#fff;padding:1em;
 border:1px solid #ccc;white-space:pre-wrap;word-break:break-all}
.t{padding:1px 0;border-radius:2px}
.marker{outline:2px dashed #d62728;outline-offset:-1px;font-weight:bold}
.repaired{outline:2px solid #ff7f0e;outline-offset:-1px;text-decoration:underline wavy #ff7f0e}
.recalled{outline:2px solid #1f77b4;outline-offset:-1px}
.legend{display:flex;align-items:center;gap:.5em;font-size:.85em;margin:.5em 0}
.bar{display:flex;height:14px;width:256px;border:1px solid #999}
.bar span{flex:1}
table{border-collapse:collapse;font-size:12px;font-family:ui-monospace,monospace}
td,th{border:1px solid #ddd;padding:1px 6px;text-align:right} td.tok{text-align:left}
.journal{max-height:40em;overflow:auto}
"""


def render_html(session, *, title: str = "Halo Weave memory", cmap: str = "viridis",
                journal_rows: int = JOURNAL_ROWS) -> str:
    """The HTML page (a str) for `session`: remembered text coloured by brightness, legend, journal panel."""
    palette = brightness_palette(cmap)
    tokenizer = session.tokenizer
    mem = session.memory()
    diffs = {int(pos): (int(old), int(new)) for pos, old, new in session.diffs}
    stats = session.stats()
    esc = html.escape
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        "<p class=\"stats\">" + " &middot; ".join(f"{esc(str(k))}: {esc(f'{v:.3f}' if isinstance(v, float) else str(v))}"
                                                 for k, v in stats.items()) + "</p>",
        "<div class=\"legend\">brightness <b>0</b><div class=\"bar\">"
        + "".join(f"<span style=\"background:{palette[i]}\" title=\"{i}\"></span>" for i in range(0, 256, 4))
        + "</div><b>255</b> <span class=\"t marker\" title=\"legend: elision marker, brightness shown as colour\">[...]</span> elision marker "
          "<span class=\"t repaired\" title=\"legend: repaired token, hover shows old -&gt; new, position, brightness\">tok</span> repaired token (hover for details) "
          "<span class=\"t recalled\" title=\"legend: token brought back by recall\">tok</span> recalled token</div>",
        f"<h2>Remembered: {len(mem)} tokens</h2><div class=\"memory\">",
    ]
    positions = mem.positions.tolist()
    token_ids = mem.token_ids.tolist()
    bright = mem.brightness.tolist()
    units = mem.units.tolist()
    layers, all_layers = mem.layers.tolist(), getattr(session.cache, "num_rows", session.cache.num_layers)
    held_by = "KV heads" if session.config.granularity == "head" else "layers"
    recalled = mem.recalled.tolist()
    i, n = 0, len(positions)
    while i < n:
        source = mem.sources[i]
        if source == "marker":  # one span per marker (its tokens share a unit)
            j = i
            while j < n and mem.sources[j] == "marker" and units[j] == units[i]:
                j += 1
            text = tokenizer.decode([t for t in token_ids[i:j] if t >= 0])
            level = _level(max(bright[i:j]))
            tip = f"elision marker: lines left out around position {positions[i]}; brightness {level}"
            parts.append(f"<span class=\"t marker\" style=\"background:{palette[level]};color:{_ink(palette[level])}\" "
                         f"title=\"{esc(tip)}\">{_visible(text)}</span>")
            i = j
            continue
        pos, tid, level = positions[i], token_ids[i], _level(bright[i])
        tip = f"position {pos}; source {source}; brightness {bright[i]:.1f}; token {tid}"
        held = ""
        if layers[i] < all_layers:
            tip += f"; held by {layers[i]} of {all_layers} {held_by}"
            held = f"opacity:{0.35 + 0.65 * (layers[i] - 1) / max(1, all_layers - 1):.2f};"
        cls = "t"
        if pos in diffs:
            old, new = diffs[pos]
            tip += f"; repaired {_token_text(tokenizer, old)!r} ({old}) -> {_token_text(tokenizer, new)!r} ({new})"
            cls += " repaired"
        if recalled[i]:
            tip += "; recalled: forgotten, then brought back when the conversation pointed at it"
            cls += " recalled"
        parts.append(f"<span class=\"{cls}\" style=\"{held}background:{palette[level]};color:{_ink(palette[level])}\" "
                     f"title=\"{esc(tip)}\">{_visible(_token_text(tokenizer, tid))}</span>")
        i += 1
    parts.append("</div>")
    entries = session.journal.entries
    shown = entries[-journal_rows:] if journal_rows else []
    parts.append(f"<h2>Forgotten: {len(entries)} tokens</h2>")
    if len(shown) < len(entries):
        parts.append(f"<p class=\"stats\">showing the newest {len(shown)} evictions</p>")
    parts.append("<div class=\"journal\"><table><tr><th>step</th><th>position</th><th>token</th><th>id</th>"
                 "<th>source</th><th>brightness</th></tr>")
    for e in shown:
        level = _level(e.brightness)
        parts.append(f"<tr><td>{e.step}</td><td>{e.position}</td><td class=\"tok\">"
                     f"{_visible(_token_text(tokenizer, e.token_id))}</td><td>{e.token_id}</td><td>{esc(e.source)}</td>"
                     f"<td style=\"background:{palette[level]};color:{_ink(palette[level])}\">{e.brightness:.1f}</td></tr>")
    parts.append("</table></div></body></html>\n")
    return "".join(parts)


def write_html(session, path, **kwargs) -> Path:
    """Write `render_html(session)` to `path` (atomically); returns the path."""
    return atomic_write_bytes(path, render_html(session, **kwargs).encode("utf-8"))


def write_png(session, path, retained_history: list[int] | None = None, *, cmap: str = "viridis") -> Path:
    """PNG: brightness over position of the retained tokens (scatter + colour strip) and, when given, the
    retained size after each feed/generate step (`retained_history`)."""
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: no global backend state (Agg renders the PNG)

    mem = session.memory()
    pos = mem.positions.numpy()
    bright = mem.brightness.numpy()
    rows = 3 if retained_history else 2
    fig = Figure(figsize=(10, 2.2 * rows + 1))
    axes = fig.subplots(rows, 1, squeeze=False, gridspec_kw={"height_ratios": [3, 0.6] + ([3] if retained_history else [])})
    ax = axes[0, 0]
    ax.scatter(pos, bright, c=bright, cmap=cmap, vmin=0, vmax=255, s=6)
    for entry_pos in sorted({p for p, s in zip(pos.tolist(), mem.sources) if s == "marker"}):
        ax.axvline(entry_pos, color="#d62728", lw=0.6, alpha=0.6)
    ax.set_ylim(-5, 260)
    ax.set_ylabel("brightness")
    ax.set_title(f"retained tokens: {len(mem)} / budget {session.config.budget} (red lines: elision markers)")
    strip = axes[1, 0]
    strip.imshow(np.asarray(bright, dtype=np.float32)[None, :] if len(bright) else np.zeros((1, 1)),
                 aspect="auto", cmap=cmap, vmin=0, vmax=255)
    strip.set_yticks([])
    strip.set_xlabel("retained tokens in position order")
    if retained_history:
        ax3 = axes[2, 0]
        ax3.plot(range(1, len(retained_history) + 1), retained_history, lw=1)
        ax3.axhline(session.config.budget, color="grey", ls="--", lw=0.8, label="budget")
        ax3.set_xlabel("step")
        ax3.set_ylabel("retained")
        ax3.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path
