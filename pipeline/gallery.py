"""The library's static HTML gallery: one card per asset (preview, name, seed, faces, status, mesh link).

The page has no external resources (it opens from a file, an S3 website or any static host); a small
inline script counts previews that loaded and writes the count into ``data-previews-loaded`` on <body>,
which a headless browser check reads.
"""
from __future__ import annotations

import html
from datetime import datetime, timezone

STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;background:#f6f6f4;color:#222}
h1{font-size:20px} .summary{color:#555;margin-bottom:16px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:14px}
.card{background:#fff;border-radius:8px;padding:10px;box-shadow:0 1px 3px #0002}
.card img{width:100%;aspect-ratio:1;object-fit:contain;background:#fff}
.card.error{border:2px solid #c33}.meta{font-size:12px;color:#555;word-break:break-all}
.err{font-size:12px;color:#a00;word-break:break-word}
"""

SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img.preview'), ok = 0;
  imgs.forEach(function (im) { if (im.complete && im.naturalWidth > 0) ok++; });
  document.body.setAttribute('data-previews-loaded', String(ok));
  document.body.setAttribute('data-previews-total', String(imgs.length));
});
"""


def _card(row: dict) -> str:
    e = html.escape
    aid = e(row["asset_id"])
    if row["status"] == "ok":
        body = (f'<img class="preview" src="{e(row["preview"])}" alt="{aid}" loading="eager">'
                f'<div><a href="{e(row["mesh"])}">{aid}</a></div>'
                f'<div class="meta">seed {row["seed"]} · {row["faces"]:,} faces · {row["seconds"]:.1f} s</div>')
    else:
        body = (f'<div><b>{aid}</b></div><div class="meta">seed {row["seed"]}</div>'
                f'<div class="err">{e(row["error"] or "failed")}</div>')
    return (f'<div class="card {e(row["status"])}" data-asset="{aid}" data-status="{e(row["status"])}">'
            f'{body}<div class="meta">{e(row["source"])}</div></div>')


def gallery_html(rows: list[dict], title: str = "s2ray asset library") -> str:
    """The page for index rows (dicts with asset_id, status, preview, mesh, seed, faces, seconds, error, source)."""
    rows = sorted(rows, key=lambda r: (r["status"] != "ok", r["asset_id"]))
    ok = sum(r["status"] == "ok" for r in rows)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cards = "\n".join(_card(r) for r in rows)
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<style>{STYLE}</style></head><body data-assets="{len(rows)}">'
            f'<h1>{html.escape(title)}</h1><div class="summary">{ok} meshes, {len(rows) - ok} failed · {stamp}</div>'
            f'<div class="grid">\n{cards}\n</div><script>{SCRIPT}</script></body></html>')
