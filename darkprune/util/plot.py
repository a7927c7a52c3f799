"""Small line/scatter charts drawn with OpenCV (no plotting library among our dependencies), written as PNG."""
from __future__ import annotations

import colorsys
import math

import cv2
import numpy as np

from .files import atomic_write_bytes


def _palette(n: int) -> list[tuple[int, int, int]]:
    out = []
    for i in range(max(n, 1)):
        r, g, b = colorsys.hsv_to_rgb((0.58 + i * 0.618034) % 1.0, 0.75, 0.85)   # blue first: red marks highlights
        out.append((int(b * 255), int(g * 255), int(r * 255)))
    return out


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 1e-9:
        if t >= lo - step * 1e-9:
            ticks.append(round(t, 10))
        t += step
    return ticks


def line_chart(path, series: list[dict], title: str, xlabel: str, ylabel: str, size=(960, 640),
               legend_max: int = 14) -> None:
    """series: [{"label": str, "x": [...], "y": [...], "marker": bool, "highlight": bool}]. Written atomically."""
    w, h = size
    img = np.full((h, w, 3), 255, np.uint8)
    left, right, top, bottom = 90, 30 + (190 if len(series) > 1 else 0), 50, 70
    xs = [v for s in series for v in s["x"]]
    ys = [v for s in series for v in s["y"]]
    if not xs:
        xs, ys = [0.0, 1.0], [0.0, 1.0]
    x_lo, x_hi = min(xs), max(xs)
    y_lo, y_hi = min(ys), max(ys)
    pad_x = (x_hi - x_lo) * 0.05 or 0.5
    pad_y = (y_hi - y_lo) * 0.08 or 0.5
    x_lo, x_hi, y_lo, y_hi = x_lo - pad_x, x_hi + pad_x, y_lo - pad_y, y_hi + pad_y

    def px(x, y):
        return (int(left + (x - x_lo) / (x_hi - x_lo) * (w - left - right)),
                int(h - bottom - (y - y_lo) / (y_hi - y_lo) * (h - top - bottom)))

    font = cv2.FONT_HERSHEY_SIMPLEX
    for t in _nice_ticks(x_lo, x_hi):
        p = px(t, y_lo)
        cv2.line(img, (p[0], top), (p[0], h - bottom), (235, 235, 235), 1)
        cv2.putText(img, f"{t:g}", (p[0] - 15, h - bottom + 20), font, 0.45, (60, 60, 60), 1, cv2.LINE_AA)
    for t in _nice_ticks(y_lo, y_hi):
        p = px(x_lo, t)
        cv2.line(img, (left, p[1]), (w - right, p[1]), (235, 235, 235), 1)
        cv2.putText(img, f"{t:g}", (8, p[1] + 5), font, 0.45, (60, 60, 60), 1, cv2.LINE_AA)
    cv2.rectangle(img, (left, top), (w - right, h - bottom), (80, 80, 80), 1)
    cv2.putText(img, title, (left, 30), font, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, xlabel, (left + (w - left - right) // 2 - 60, h - 25), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, ylabel, (8, top - 12), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    colors = _palette(len(series))
    for i, s in enumerate(series):
        color = (0, 0, 220) if s.get("highlight") else colors[i]
        pts = [px(x, y) for x, y in zip(s["x"], s["y"])]
        if len(pts) > 1 and not s.get("scatter"):
            cv2.polylines(img, [np.array(pts, np.int32)], False, color, 2 if s.get("highlight") else 1, cv2.LINE_AA)
        if s.get("marker", True):
            for p in pts:
                cv2.circle(img, p, 5 if s.get("highlight") else 3, color, -1, cv2.LINE_AA)
        for p, text in zip(pts, s.get("point_labels", [])):
            cv2.putText(img, str(text), (p[0] + 6, p[1] - 6), font, 0.4, color, 1, cv2.LINE_AA)
        if len(series) > 1 and i < legend_max:
            y = top + 10 + 18 * i
            cv2.line(img, (w - right + 10, y), (w - right + 30, y), color, 2)
            cv2.putText(img, str(s["label"])[:24], (w - right + 35, y + 4), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    if len(series) > legend_max:
        cv2.putText(img, f"(+{len(series) - legend_max} more)", (w - right + 10, top + 10 + 18 * legend_max),
                    font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    ok, buf = cv2.imencode(".png", img)
    atomic_write_bytes(path, buf.tobytes())
