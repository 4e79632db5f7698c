"""HTML of the embedding map: an inline SVG scatter, a legend, and a JSON block for its script.

Points are ``<circle class=pt data-i=N>`` coloured by cluster. Hovering a point (or clicking
it, which pins it) shows its thumbnail, cut from its cluster's montage sprite with a CSS
``background-position`` (no image is embedded twice), and its id. A legend entry jumps to its
cluster through the page's search box, so clusters on other pages work too. With labels, a
checkbox recolours the points by label.

Every id and label reaches the page escaped: in HTML through ``html.escape``, in the JSON
block with ``<``, ``>`` and ``&`` as ``\\u003c``-style escapes, so no id can close the
``<script type=application/json>`` element.
"""

from __future__ import annotations

import html
import json
from collections import Counter
from typing import Any

import numpy as np

from pipeline.report.embedding import EmbeddingMap
from pipeline.report.montage import GAP

E = html.escape
WIDTH, HEIGHT, PAD = 760, 520, 12
# Tableau 20 (matplotlib's tab20 order, strong shades first): deterministic, cycles for k > 20.
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896",
           "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5"]
OTHERS = "#b0b0b0"

MAP_STYLE = """
#mapwrap{display:flex;gap:16px;align-items:flex-start;flex-wrap:wrap}
#map{border:1px solid #dde3ea;background:#fff} #map circle{cursor:pointer;fill-opacity:.8}
#map circle:hover{stroke:#000;stroke-width:1.5}
#map-info{width:220px} #map-info .thumb{border:1px solid #dde3ea;background-repeat:no-repeat;
image-rendering:pixelated} #map-cap{word-break:break-all;font-size:12px}
.legend{display:flex;flex-wrap:wrap;gap:2px 10px;font-size:12px;margin-top:6px}
.legend a{color:inherit;text-decoration:none;white-space:nowrap} .legend a:hover{
text-decoration:underline} .legend i{display:inline-block;width:10px;height:10px;
margin-right:3px;border-radius:50%}
.legend[hidden]{display:none}
"""

MAP_SCRIPT = """
(function(){
  const el=document.getElementById('map-data'); if(!el) return;
  const d=JSON.parse(el.textContent); const svg=document.getElementById('map');
  const pts=[...svg.querySelectorAll('circle.pt')]; const thumb=document.getElementById('map-thumb');
  const cap=document.getElementById('map-cap'); let pinned=-1;
  function show(i){ if(i<0){thumb.hidden=true; cap.textContent='hover or click a point'; return;}
    const c=d.cluster[i], img=document.querySelector('#cluster-'+c+' img'), t=d.tile[i];
    const step=d.px+d.gap; thumb.hidden=!img;
    if(img){thumb.style.backgroundImage='url("'+img.src+'")';
      thumb.style.backgroundPosition=(-d.gap-t[1]*step)+'px '+(-d.gap-t[0]*step)+'px';}
    const lab=d.labels?d.labels[i]:null;
    cap.textContent=d.ids[i]+' · cluster '+c+(lab===null?'':' · label '+lab);
    cap.dataset.i=i;}
  const idx=e=>e.target.dataset?e.target.dataset.i:undefined;
  svg.addEventListener('mouseover',e=>{const i=idx(e); if(i!==undefined) show(+i);});
  svg.addEventListener('mouseout',e=>{if(idx(e)!==undefined) show(pinned);});
  svg.addEventListener('click',e=>{const i=idx(e); pinned=i===undefined?-1:+i; show(pinned);});
  function go(c){const box=document.getElementById('search'); box.value=String(c);
    box.dispatchEvent(new Event('input')); const s=document.getElementById('cluster-'+c);
    if(s) s.scrollIntoView();}
  document.querySelectorAll('.legend').forEach(l=>l.addEventListener('click',e=>{
    const a=e.target.closest('a[data-c]'); if(!a) return; e.preventDefault(); go(a.dataset.c);}));
  const tog=document.getElementById('map-by-label');
  if(tog) tog.onchange=()=>{const key=tog.checked?'lcolor':'ccolor';
    pts.forEach((p,i)=>p.setAttribute('fill',d[key][i]));
    document.getElementById('map-legend').hidden=tog.checked;
    document.getElementById('map-label-legend').hidden=!tog.checked;};
  show(-1);
})();
"""


def map_section(emap: EmbeddingMap | None, note: str, thumb_px: int, legend_cap: int) -> str:
    """The whole map block (SVG, info panel, legends, JSON data), or a note without one."""
    if emap is None or not emap.ids:
        return f"<p class=muted id=map-none>{E(note or 'No embedding map.')}</p>"
    order = _cluster_order(emap.clusters)
    ccolor = [_color(order, c) for c in emap.clusters]
    lcolor, label_legend = _label_colors(emap.labels, legend_cap)
    toggle = ("<label><input type=checkbox id=map-by-label> colour by label</label>"
              if emap.labels is not None else "")
    info = (f"<div id=map-info>{toggle}<div id=map-thumb class=thumb hidden "
            f"style='width:{thumb_px}px;height:{thumb_px}px'></div>"
            f"<div id=map-cap class=muted></div></div>")
    return (f"<div id=embedding><p class=muted>{E(note)} Colours: largest clusters first, repeating every "
            f"{len(PALETTE)}; click a legend entry to open its cluster.</p>"
            f"<div id=mapwrap>{scatter_svg(emap.xy, ccolor)}{info}</div>"
            f"{_cluster_legend(emap.clusters, order, legend_cap)}{label_legend}"
            f"{json_block(_payload(emap, ccolor, lcolor, thumb_px))}</div>")


def scatter_svg(xy: np.ndarray, colors: list[str]) -> str:
    """(n, 2) points in [0, 1] -> an SVG of n ``circle.pt`` (y grows upwards)."""
    w, h = WIDTH - 2 * PAD, HEIGHT - 2 * PAD
    dots = [f"<circle class=pt data-i={i} cx={PAD + w * x:.1f} cy={PAD + h * (1 - y):.1f} "
            f"r=3.5 fill='{color}'/>"
            for i, ((x, y), color) in enumerate(zip(xy.tolist(), colors, strict=True))]
    return f"<svg id=map width={WIDTH} height={HEIGHT} role=img>{''.join(dots)}</svg>"


def _cluster_order(clusters: list[int]) -> dict[int, int]:
    """Rank of each cluster on the map: most points first, then by id (deterministic)."""
    counts = Counter(clusters)
    ranked = sorted(counts, key=lambda c: (-counts[c], c))
    return {c: r for r, c in enumerate(ranked)}


def _color(order: dict[Any, int], key: Any) -> str:
    return PALETTE[order[key] % len(PALETTE)]


def _cluster_legend(clusters: list[int], order: dict[int, int], cap: int) -> str:
    """Legend of the ``cap`` clusters with most points, then one "others" entry."""
    counts = Counter(clusters)
    ranked = sorted(order, key=order.__getitem__)
    items = [f"<a href='#cluster-{c}' data-c={c}><i style='background:{_color(order, c)}'>"
             f"</i>{c} ({counts[c]})</a>" for c in ranked[:cap]]
    rest = ranked[cap:]
    if rest:
        n = sum(counts[c] for c in rest)
        items.append(f"<span>+ {len(rest)} other clusters "
                     f"({n} points; search for them below)</span>")
    return f"<div class=legend id=map-legend>{''.join(items)}</div>"


def _label_colors(labels: list[str | None] | None, cap: int) -> tuple[list[str], str]:
    """Per-point colours by label (most frequent first; None is grey) and their legend."""
    if labels is None:
        return [], ""
    counts = Counter(lab for lab in labels if lab is not None)
    ranked = sorted(counts, key=lambda lab: (-counts[lab], lab))
    order = {lab: r for r, lab in enumerate(ranked)}
    colors = [OTHERS if lab is None else _color(order, lab) for lab in labels]
    items = [f"<span><i style='background:{_color(order, lab)}'></i>{E(lab)} "
             f"({counts[lab]})</span>" for lab in ranked[:cap]]
    if len(ranked) > cap:
        items.append(f"<span>{len(ranked) - cap} other labels</span>")
    return colors, f"<div class=legend id=map-label-legend hidden>{''.join(items)}</div>"


def _payload(emap: EmbeddingMap, ccolor: list[str], lcolor: list[str],
             thumb_px: int) -> dict[str, Any]:
    return {"ids": emap.ids, "cluster": emap.clusters, "labels": emap.labels,
            "tile": [list(t) for t in emap.tiles], "ccolor": ccolor, "lcolor": lcolor,
            "px": thumb_px, "gap": GAP}


def json_block(payload: dict[str, Any]) -> str:
    """``<script type=application/json id=map-data>``: not executed; ``<``, ``>``, ``&``
    escaped so no string in it can end the element or open a comment."""
    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return f"<script type=application/json id=map-data>{text}</script>"
