"""An HTML contact sheet of search results: one row per query, thumbnails embedded, viewable offline."""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence

from PIL import Image

from clip_tao.io.atomic import write_text

THUMBNAIL = 128


def thumbnail_data_uri(path: str, size: int = THUMBNAIL) -> str | None:
    """A small JPEG of ``path`` as a ``data:`` URI (so the page needs no other file), or None if unreadable."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((size, size))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=80)
    except (OSError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def write_contact_sheet(path: str | os.PathLike, title: str, queries: Sequence[dict]) -> None:
    """``queries``: ``{"query": str, "kind": "text"|"image", "results": [{"rank", "image_path", "score"}]}``;
    an optional ``"label"`` replaces the "<kind> query" heading of a row."""
    cache: dict[str, str | None] = {}

    def picture(image_path: str) -> str:
        if image_path not in cache:
            cache[image_path] = thumbnail_data_uri(image_path)
        uri = cache[image_path]
        name = html.escape(os.path.basename(image_path))
        if uri is None:
            return f'<div class="missing">{name}<br>(not readable)</div>'
        return f'<img src="{uri}" alt="{name}" title="{html.escape(image_path)}">'

    rows = []
    for q in queries:
        head = picture(q["query"]) if q["kind"] == "image" else f"<p>{html.escape(q['query'])}</p>"
        cells = "".join(
            f"<figure>{picture(r['image_path'])}<figcaption>#{r['rank']} · {r['score']:.3f}</figcaption></figure>"
            for r in q["results"]
        )
        rows.append(
            f'<section><div class="query">{html.escape(q.get("label", q["kind"] + " query"))}{head}</div><div class="hits">{cells}</div></section>'
        )
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
section {{ display: flex; gap: 1em; border-bottom: 1px solid #ddd; padding: 0.8em 0; }}
.query {{ width: 14em; flex: none; font-weight: bold; }}
.hits {{ display: flex; flex-wrap: wrap; gap: 0.6em; }}
figure {{ margin: 0; text-align: center; font-size: 0.8em; }}
img {{ max-width: {THUMBNAIL}px; max-height: {THUMBNAIL}px; display: block; }}
.missing {{ width: {THUMBNAIL}px; height: {THUMBNAIL}px; background: #eee; font-size: 0.8em; }}
</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
{"".join(rows)}
</body>
</html>
"""
    write_text(path, page)
