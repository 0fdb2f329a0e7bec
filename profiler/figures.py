"""Inline SVG figures for the HTML report (no scripts, nothing fetched): one horizontal stacked bar per row."""

from __future__ import annotations

import html

__all__ = ["stacked_bars_svg"]

_PALETTE = ("#4c78a8", "#72b7b2", "#e45756", "#f58518", "#bab0ac", "#54a24b", "#b279a2", "#9d755d")


def stacked_bars_svg(bars: list[tuple[str, float, list[tuple[str, float]]]], *, width: int = 720) -> str:
    """One bar per ``(label, total, [(segment, value), ...])``, segments scaled to ``total`` (the longest
    total when it is 0); a legend names the segments, each segment's tooltip gives its value in ms and %."""
    if not bars:
        return ""
    names = list(dict.fromkeys(name for _, _, parts in bars for name, _ in parts))
    colour = {name: _PALETTE[i % len(_PALETTE)] for i, name in enumerate(names)}
    longest = max((max(total, sum(max(v, 0.0) for _, v in parts)) for _, total, parts in bars), default=0.0) or 1.0
    bar_h, left, top = 22, 90, 24
    height = top + len(bars) * (bar_h + 8)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width + left + 10}" height="{height}" role="img">']
    x = float(left)
    for name in names:  # legend
        out.append(f'<rect x="{x:.0f}" y="2" width="12" height="12" fill="{colour[name]}"/>'
                   f'<text x="{x + 16:.0f}" y="13" font-size="12">{html.escape(name)}</text>')
        x += 30 + 7 * len(name)
    for i, (label, total, parts) in enumerate(bars):
        scale = total if total > 0 else longest
        y = top + i * (bar_h + 8)
        out.append(f'<text x="0" y="{y + 15}" font-size="12">{html.escape(label)}</text>')
        x = float(left)
        for name, value in parts:
            w = max(value, 0.0) / scale * width
            if w <= 0:
                continue
            tip = f"{label}: {name} {value / 1000:.2f} ms ({100 * value / scale:.1f}%)"
            out.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{colour[name]}">'
                       f"<title>{html.escape(tip)}</title></rect>")
            x += w
    out.append("</svg>")
    return "".join(out)
