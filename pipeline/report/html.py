"""HTML for ``report.html``: one self-contained page, no network (a CSP forbids it).

Plots are inline SVG, images are data URIs, and a few lines of inline JavaScript page
through the cluster sections and filter them by cluster id or label. Without JavaScript the
first page still shows.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.report.data import ClusterView, Confusion, ReportData
from pipeline.report.map_view import MAP_SCRIPT, MAP_STYLE, map_section
from pipeline.report.montage import data_uri, montage

CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
       "script-src 'unsafe-inline'")
E = html.escape

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:0 16px 48px;
color:#1d2733}
h1{font-size:22px;margin:20px 0 4px} h2{font-size:17px;margin:28px 0 8px;
border-bottom:1px solid #dde3ea;padding-bottom:4px}
.muted{color:#6b7785} .row{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
table{border-collapse:collapse} td,th{padding:2px 8px;text-align:left;
border-bottom:1px solid #eef1f4} td.n{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f6f8fa;padding:10px;overflow:auto;max-height:420px;font-size:12px}
.cluster{border:1px solid #dde3ea;border-radius:6px;padding:8px 12px;margin:10px 0}
.cluster h3{font-size:15px;margin:0 0 6px} .cluster img{display:block;max-width:100%;
image-rendering:pixelated} .pager button{margin:0 2px} .cm td{text-align:right;
font-size:12px;padding:1px 5px} .cm th{font-size:12px;padding:1px 5px}
svg text{font:11px system-ui,sans-serif;fill:#4a5561}
"""

SCRIPT = """
(function(){
  const sections=[...document.querySelectorAll('section.cluster')];
  const size=parseInt(document.body.dataset.pageSize,10); let page=0;
  const box=document.getElementById('search'); const info=document.getElementById('pageinfo');
  function shown(){const q=box.value.trim().toLowerCase(); if(!q) return sections;
    return sections.filter(s=>s.dataset.cluster===q||s.dataset.labels.split('|').includes(q));}
  function render(){const list=shown(); const pages=Math.max(1,Math.ceil(list.length/size));
    page=Math.min(page,pages-1); const on=new Set(list.slice(page*size,(page+1)*size));
    sections.forEach(s=>{s.hidden=!on.has(s);});
    info.textContent=`page ${page+1} of ${pages} (${list.length} clusters)`;}
  document.getElementById('prev').onclick=()=>{page=Math.max(0,page-1);render();};
  document.getElementById('next').onclick=()=>{page+=1;render();};
  box.oninput=()=>{page=0;render();}; render();
})();
"""


def render(data: ReportData, page_size: int, thumb_px: int, legend_cap: int = 50) -> str:
    """The page; ``legend_cap``: clusters (and labels) named in the map's legends."""
    m = data.metrics
    title = f"Clusters of {m.get('n_images', '?'):,} images" if isinstance(
        m.get("n_images"), int) else "Cluster report"
    body = [
        f"<h1>{E(title)}</h1>",
        f"<p class=muted>{E(data.run_uri)} · method {E(str(m.get('method', '?')))} · "
        f"k = {len(data.sizes)}</p>",
        "<h2>Metrics</h2>", metrics_table(m), *row_tables(m),
        "<h2>Cluster sizes</h2>", histogram_svg(data.sizes),
        "<h2>Training</h2>", curves(data.history),
    ]
    if data.confusion is not None:
        body += ["<h2>Clusters × labels</h2>", confusion_table(data.confusion)]
    body += ["<h2>Embedding map</h2>",
             map_section(data.embedding, data.map_note, thumb_px, legend_cap)]
    body += ["<h2>Clusters</h2>", f"<p class=muted>{E(data.sample_note)} Top row: nearest to "
             "the centroid; bottom row: random members. Largest clusters first.</p>",
             pager(), *cluster_sections(data.clusters, page_size, thumb_px),
             "<h2>Config</h2>", f"<pre>{E(data.config_text)}</pre>"]
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8>"
            f"<meta http-equiv=Content-Security-Policy content=\"{CSP}\">"
            f"<meta name=viewport content='width=device-width,initial-scale=1'>"
            f"<title>{E(title)}</title><style>{STYLE}{MAP_STYLE}</style></head>"
            f"<body data-page-size={page_size}>{''.join(body)}"
            f"<script>{SCRIPT}</script><script>{MAP_SCRIPT}</script></body></html>")


# --------------------------------------------------------------------------------------------
# Tables.


def _is_rows(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(r, dict) for r in value)


def metrics_table(metrics: dict[str, Any]) -> str:
    rows = []
    for key, value in metrics.items():
        if key == "epochs" or _is_rows(value):
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
        rows.append(f"<tr><th>{E(key)}</th><td>{E(_fmt(value))}</td></tr>")
    return f"<table id=metrics>{''.join(rows) or '<tr><td>no metrics.json</td></tr>'}</table>"


def row_tables(metrics: dict[str, Any]) -> list[str]:
    """A table per metric that is a list of rows, except the epochs (multiview's ``views``:
    each view and baseline with its scores)."""
    out = []
    for key, rows in metrics.items():
        if key == "epochs" or not _is_rows(rows):
            continue
        columns = list(dict.fromkeys(c for row in rows for c in row))
        head = "".join(f"<th>{E(c)}</th>" for c in columns)
        body = "".join("<tr>" + "".join(f"<td>{E(_fmt(row.get(c, '')))}</td>" for c in columns)
                       + "</tr>" for row in rows)
        out += [f"<h2>{E(key.capitalize())}</h2>",
                f"<table id={E(key)}><tr>{head}</tr>{body}</table>"]
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def confusion_table(c: Confusion) -> str:
    head = "".join(f"<th>{E(label)}</th>" for label in c.labels)
    peak = max(1, int(c.counts.max(initial=0)))
    rows = []
    for cluster, counts in zip(c.clusters, c.counts, strict=True):
        cells = "".join(
            f"<td style='background:rgba(31,119,180,{0.08 + 0.85 * v / peak:.2f})'>{v}</td>"
            if v else "<td></td>" for v in counts.tolist())
        rows.append(f"<tr><th>{cluster}</th>{cells}</tr>")
    return (f"<table class=cm id=confusion><tr><th>cluster \\ label</th>{head}</tr>"
            f"{''.join(rows)}</table>")


# --------------------------------------------------------------------------------------------
# Plots (inline SVG).


def histogram_svg(sizes: np.ndarray, width: int = 520, height: int = 180) -> str:
    """Histogram of cluster sizes: how many clusters hold how many images."""
    if len(sizes) == 0:
        return "<p>no clusters</p>"
    bins = max(1, min(30, len(sizes)))
    counts, edges = np.histogram(sizes, bins=bins)
    pad, top = 36, max(1, int(counts.max()))
    bw = (width - 2 * pad) / bins
    bars = []
    for i, n in enumerate(counts):
        h = (height - 2 * pad) * n / top
        x, y = pad + i * bw, height - pad - h
        tip = f"{int(n)} clusters with {edges[i]:.0f}–{edges[i + 1]:.0f} images"
        bars.append(f"<rect x={x:.1f} y={y:.1f} width={max(bw - 1, 1):.1f} height={h:.1f} "
                    f"fill='#1f77b4'><title>{tip}</title></rect>")
    axis = (f"<text x={pad} y={height - pad + 14}>{edges[0]:.0f}</text>"
            f"<text x={width - pad} y={height - pad + 14} text-anchor=end>{edges[-1]:.0f}</text>"
            f"<text x={width / 2} y={height - 6} text-anchor=middle>images per cluster</text>"
            f"<text x=4 y={pad - 6}>{top} clusters</text>")
    return (f"<svg id=sizes width={width} height={height} role=img>"
            f"<line x1={pad} y1={height - pad} x2={width - pad} y2={height - pad} "
            f"stroke='#999'/>{''.join(bars)}{axis}</svg>")


CURVES = [("loss", "loss"), ("sqdist", "mean squared distance (inertia / image)"),
          ("nmi", "NMI"), ("acc", "ACC"), ("images_per_s", "images/s")]


def curves(history: list[dict[str, Any]]) -> str:
    """One small line chart per recorded quantity, over epochs."""
    if not history:
        return "<p class=muted>no training history (history.json)</p>"
    charts = []
    for key, name in CURVES:
        points = [(h["epoch"], h[key]) for h in history if isinstance(h.get(key), (int, float))
                  and math.isfinite(h[key])]
        if points:
            charts.append(line_svg(points, name, key))
    return f"<div class=row id=curves>{''.join(charts)}</div>"


def line_svg(points: Sequence[tuple[float, float]], name: str, key: str,
             width: int = 260, height: int = 150) -> str:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    pad = 30
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def at(x: float, y: float) -> str:
        return (f"{pad + (width - 2 * pad) * (x - x0) / (x1 - x0):.1f},"
                f"{height - pad - (height - 2 * pad) * (y - y0) / (y1 - y0):.1f}")

    path = " ".join(at(x, y) for x, y in points)
    dots = "".join(f"<circle cx={at(x, y).split(',')[0]} cy={at(x, y).split(',')[1]} r=2 "
                   f"fill='#1f77b4'><title>epoch {x}: {y:.4g}</title></circle>"
                   for x, y in points)
    return (f"<svg class=curve data-key={key} width={width} height={height} role=img>"
            f"<text x={pad} y=14>{E(name)}</text>"
            f"<polyline fill=none stroke='#1f77b4' stroke-width=1.5 points='{path}'/>{dots}"
            f"<text x={pad} y={height - 8}>epoch {x0:g}</text>"
            f"<text x={width - pad} y={height - 8} text-anchor=end>{x1:g}</text>"
            f"<text x=2 y={pad}>{y1:.3g}</text><text x=2 y={height - pad}>{y0:.3g}</text>"
            f"</svg>")


# --------------------------------------------------------------------------------------------
# Cluster sections.


def pager() -> str:
    return ("<div class=pager><input id=search placeholder='cluster id or label' size=22> "
            "<button id=prev>&larr; prev</button><button id=next>next &rarr;</button> "
            "<span id=pageinfo class=muted></span></div>")


def cluster_sections(views: list[ClusterView], page_size: int, thumb_px: int) -> list[str]:
    total = max(1, sum(v.size for v in views))
    out = []
    for i, view in enumerate(views):
        hidden = " hidden" if i >= page_size else ""
        labels = "|".join(E(name.lower()) for name, _ in view.top_labels[:1])
        out.append(f"<section class=cluster id=cluster-{view.cluster} "
                   f"data-cluster={view.cluster} data-labels='{labels}'{hidden}>"
                   f"<h3>Cluster {view.cluster}</h3><p class=muted>{_facts(view, total)}</p>"
                   f"{_montage(view, thumb_px)}</section>")
    return out


def _facts(view: ClusterView, total: int) -> str:
    parts = [f"{view.size:,} images ({100 * view.size / total:.1f}%)"]
    if view.size:
        parts.append(f"mean distance {view.mean_distance:.3g}")
    if view.threshold is not None:
        parts.append(f"outlier threshold {view.threshold:.3g}")
    if view.top_labels:
        parts.append("labels " + ", ".join(f"{E(n)} {100 * c / max(1, view.size):.0f}%"
                                           for n, c in view.top_labels))
    return " · ".join(parts)


def _montage(view: ClusterView, thumb_px: int) -> str:
    if not view.sampled:
        return "<p class=muted>no montage: beyond report.max_montages</p>"
    if not (view.nearest or view.random):
        return "<p class=muted>no members in the sampled shards</p>"
    uri = data_uri(montage([view.nearest, view.random], thumb_px))
    return f"<img alt='cluster {view.cluster} montage' src='{uri}'>"
