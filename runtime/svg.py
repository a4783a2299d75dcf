"""Self-contained SVG line charts (no plotting library, no network): for benchmarks and reports."""

from __future__ import annotations

from html import escape

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")


def line_chart(series: dict[str, tuple[list, list]], title: str, xlabel: str, ylabel: str,
               width: int = 640, height: int = 320, log_y: bool = False, y_zero: bool = False) -> str:
    """series: name -> (xs, ys). Returns an <svg> element as text. y_zero starts the y axis at 0;
    series with few points get a marker on each."""
    import math

    pts = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys) if y == y]
    if not pts:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="40"><text x="4" y="20">{escape(title)}: no data</text></svg>'
    fy = (lambda v: math.log10(max(v, 1e-12))) if log_y else (lambda v: v)
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(fy(p[1]) for p in pts), max(fy(p[1]) for p in pts)
    if y_zero and not log_y:
        y0 = min(y0, 0.0)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    pad_l, pad_r, pad_t, pad_b = 64, 16, 28, 40
    w, h = width - pad_l - pad_r, height - pad_t - pad_b

    def sx(x):
        return pad_l + (x - x0) / (x1 - x0) * w

    def sy(y):
        return pad_t + h - (fy(y) - y0) / (y1 - y0) * h

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
           f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{escape(title)}</text>',
           f'<rect x="{pad_l}" y="{pad_t}" width="{w}" height="{h}" fill="none" stroke="#999"/>']
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        label = 10**yv if log_y else yv
        yy = pad_t + h - h * i / 4
        out.append(f'<text x="{pad_l - 4}" y="{yy + 4:.1f}" text-anchor="end">{label:.3g}</text>')
        xv = x0 + (x1 - x0) * i / 4
        out.append(f'<text x="{pad_l + w * i / 4:.1f}" y="{pad_t + h + 14}" text-anchor="middle">{xv:.4g}</text>')
    out.append(f'<text x="{pad_l + w / 2}" y="{height - 6}" text-anchor="middle">{escape(xlabel)}</text>')
    out.append(f'<text x="12" y="{pad_t + h / 2}" transform="rotate(-90 12 {pad_t + h / 2})" text-anchor="middle">{escape(ylabel)}</text>')
    for k, (name, (xs, ys)) in enumerate(series.items()):
        color = COLORS[k % len(COLORS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, ys) if y == y)
        out.append(f'<polyline class="series" fill="none" stroke="{color}" stroke-width="1.5" points="{path}"/>')
        if len(xs) <= 12:
            out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}"/>' for x, y in zip(xs, ys) if y == y]
        out.append(f'<text x="{pad_l + 8}" y="{pad_t + 14 + 13 * k}" fill="{color}">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def bar_chart(labels: list[str], values: list[float], title: str, xlabel: str, ylabel: str,
              width: int = 640, height: int = 320, color: str = COLORS[0]) -> str:
    """Vertical bars, one per label (a histogram when the labels are bin edges)."""
    if not values:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="40"><text x="4" y="20">{escape(title)}: no data</text></svg>'
    pad_l, pad_r, pad_t, pad_b = 64, 16, 28, 52
    w, h = width - pad_l - pad_r, height - pad_t - pad_b
    top = max(values) or 1.0
    bw = w / len(values)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
           f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{escape(title)}</text>',
           f'<rect x="{pad_l}" y="{pad_t}" width="{w}" height="{h}" fill="none" stroke="#999"/>']
    for i in range(5):
        yy = pad_t + h - h * i / 4
        out.append(f'<text x="{pad_l - 4}" y="{yy + 4:.1f}" text-anchor="end">{top * i / 4:.3g}</text>')
    step = max(1, len(labels) // 8)
    for i, (label, v) in enumerate(zip(labels, values)):
        bh = h * v / top
        x = pad_l + i * bw
        out.append(f'<rect class="bar" x="{x + 1:.1f}" y="{pad_t + h - bh:.1f}" width="{max(bw - 2, 1):.1f}" height="{bh:.1f}" fill="{color}"/>')
        if i % step == 0:
            out.append(f'<text x="{x + bw / 2:.1f}" y="{pad_t + h + 14}" text-anchor="middle">{escape(label)}</text>')
    out.append(f'<text x="{pad_l + w / 2}" y="{height - 6}" text-anchor="middle">{escape(xlabel)}</text>')
    out.append(f'<text x="12" y="{pad_t + h / 2}" transform="rotate(-90 12 {pad_t + h / 2})" text-anchor="middle">{escape(ylabel)}</text>')
    out.append("</svg>")
    return "\n".join(out)
