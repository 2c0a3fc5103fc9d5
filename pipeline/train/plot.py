"""Loss curve as a PNG (Pillow only: no plotting library on training nodes)."""
from __future__ import annotations

import math

from PIL import Image, ImageDraw


def loss_curve_png(steps: list[int], losses: list[float], path: str, title: str = "loss",
                   size: tuple[int, int] = (640, 360)) -> None:
    """Raw loss (light) and its running mean (dark) against step; log scale when the range spans 10x."""
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    pts = [(s, l) for s, l in zip(steps, losses) if math.isfinite(l) and l > 0]
    left, right, top, bottom = 60, w - 20, 30, h - 40
    d.rectangle([left, top, right, bottom], outline="black")
    d.text((left, 8), f"{title}  ({len(pts)} steps)", fill="black")
    if pts:
        lo, hi = min(l for _, l in pts), max(l for _, l in pts)
        use_log = hi > 10 * lo
        f = (math.log10 if use_log else (lambda v: v))
        ylo, yhi = f(lo), f(hi) if f(hi) > f(lo) else f(lo) + 1e-9
        s0, s1 = pts[0][0], max(pts[-1][0], pts[0][0] + 1)

        def xy(s, l):
            return (left + (s - s0) / (s1 - s0) * (right - left), bottom - (f(l) - ylo) / (yhi - ylo) * (bottom - top))

        d.line([xy(s, l) for s, l in pts], fill=(170, 190, 230), width=1)
        k = max(1, len(pts) // 20)
        smooth = [(pts[i][0], sum(l for _, l in pts[max(0, i - k + 1):i + 1]) / len(pts[max(0, i - k + 1):i + 1]))
                  for i in range(len(pts))]
        d.line([xy(s, l) for s, l in smooth], fill=(20, 60, 160), width=2)
        d.text((4, top), f"{hi:.3g}", fill="black")
        d.text((4, bottom - 10), f"{lo:.3g}" + (" log" if use_log else ""), fill="black")
        d.text((left, bottom + 8), str(s0), fill="black")
        d.text((right - 40, bottom + 8), str(s1), fill="black")
    img.save(path)
