"""The viewer's Flask app: pages, deep-zoom tiles and overlays (see :mod:`mil.viewer`).

Routes take slide ids only (checked against the store), never paths; a slide file is read only
from the store's recorded source or the --slides folders (:meth:`ViewerData.slide_path`). A slide
that cannot be opened answers its tiles with an error tile, and its page says why.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from urllib.parse import urlencode

from flask import Flask, Response, abort, render_template_string, request

from mil.viewer.data import ViewerData, ViewerError, error_tile, run_rows, summary

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"

INDEX = """<!doctype html><html><head><meta charset="utf-8"><title>featstore view</title>
<style>body{font:14px sans-serif;margin:1.5em}table{border-collapse:collapse}td,th{padding:3px 10px;
border-bottom:1px solid #ddd;text-align:left}</style></head><body>
<h2>{{ store }}</h2>
{% if runs|length > 1 %}<p id="runs">runs: {% for r in runs %}<a href="?run={{ r|urlencode }}">{% if r == name %}<b>{{ r }}</b>{% else %}{{ r }}{% endif %}</a> {% endfor %}</p>{% endif %}
{% if run %}<p>run <code>{{ run }}</code> ({{ task }}{% for k, v in metrics %}; {{ k }} {{ v }}{% endfor %})</p>{% endif %}
{% if seg %}<p id="seg">class maps <code>{{ seg }}</code>: area per class in mm²</p>{% endif %}
<table id="slides"><tr><th>slide</th>{% if tiles %}<th>tiles</th>{% endif %}{% for c in columns %}<th>{{ c }}</th>{% endfor %}</tr>
{% for s in slides %}<tr><td><a href="slide/{{ s.id }}{{ q }}">{{ s.id }}</a></td>{% if tiles %}<td>{{ s.tiles }}</td>{% endif %}
{% for c in columns %}<td>{{ s.row.get(c, "") }}</td>{% endfor %}</tr>{% endfor %}</table></body></html>"""

SLIDE = """<!doctype html><html><head><meta charset="utf-8"><title>{{ sid }}</title>
<script src="../static/openseadragon/openseadragon.min.js"></script>
<style>body{font:13px sans-serif;margin:0;display:flex;height:100vh}#osd{flex:1;background:#222}
#side{width:260px;padding:10px;overflow:auto}.bar{height:12px;background:linear-gradient(to right,
#00007f,#0000ff,#007fff,#00ffff,#7fff7f,#ffff00,#ff7f00,#ff0000,#7f0000)}</style></head><body>
<div id="osd"></div><div id="side"><a href="../{{ q }}">all slides</a><h3>{{ sid }}</h3><p id="title">{{ title }}</p>
{% if run %}<p>run <code>{{ run }}</code></p>{% endif %}
{% if error %}<p id="error" style="color:#b00">{{ error }}</p>{% endif %}
{% if overlay %}<label><input type="checkbox" id="overlay" checked> attention</label><br>
<input type="range" id="opacity" min="0" max="100" value="50"> opacity<div class="bar"></div>
<small>low attention &larr; &rarr; high (rank-normalised, mean over folds)</small>
<h4>top tiles</h4><ol id="top">{% for t in top %}<li><a href="#" data-box="{{ t.x }},{{ t.y }},{{ t.size }}">
row {{ t.row }}: {{ '%.3f' % t.score }}</a></li>{% endfor %}</ol>{% endif %}
{% if seg %}<h4>segmentation</h4><label><input type="checkbox" id="mask" checked> class map</label><br>
<input type="range" id="mask-opacity" min="0" max="100" value="50"> opacity
<ul id="legend" style="list-style:none;padding:0">{% for name, color in legend %}<li><span style="display:inline-block;
width:12px;height:12px;background:{{ color }}"></span> {{ name }}</li>{% endfor %}</ul>
<small>{{ seg }}</small>{% endif %}
{% if tiles is not none %}<p>{{ tiles }} tissue tiles of {{ size0 }} level-0 px</p>{% endif %}</div>
<script>
const cfg = {{ cfg|safe }};
// the canvas drawer: OpenSeadragon 5's WebGL drawer took 3.8 s instead of 0.8 s to first paint where
// WebGL is software-rendered (headless, remote desktops); canvas is fast everywhere
const viewer = OpenSeadragon({id: "osd", prefixUrl: "../static/openseadragon/images/", tileSources: cfg.dzi,
  showNavigator: true, animationTime: 0.2, crossOriginPolicy: "Anonymous", drawer: "canvas"});
window.fsReady = false;
function ready() { window.fsReady = [...Array(viewer.world.getItemCount()).keys()]
  .every(i => viewer.world.getItemAt(i).getFullyLoaded());
  if (window.fsReady && !window.fsReadyAt) window.fsReadyAt = performance.now(); }
// the overlays (attention, class map), each an image over the whole slide with its on/off box and opacity slider
const layers = [["overlay", "opacity", cfg.overlay, cfg.overlay_width], ["mask", "mask-opacity", cfg.seg, cfg.seg_width]]
  .filter(l => l[2]).map(([box, slider, url, width]) => ({box: document.getElementById(box),
    slider: document.getElementById(slider), url, width, item: null}));
viewer.addHandler("open", () => {
  layers.forEach(l => viewer.addTiledImage({tileSource: {type: "image", url: l.url}, x: 0, y: 0, width: l.width,
    opacity: 0.5, success: e => { l.item = e.item; if (l.url === cfg.overlay) window.overlayItem = e.item;
      if (l.url === cfg.seg) window.maskItem = e.item; e.item.addHandler("fully-loaded-change", ready); ready(); }}));
  viewer.world.getItemAt(0).addHandler("fully-loaded-change", ready);
});
layers.forEach(l => { const set = () => { if (l.item) l.item.setOpacity(l.box.checked ? l.slider.value / 100 : 0); };
  l.box.onchange = set; l.slider.oninput = set; });
document.querySelectorAll("#top a").forEach(a => a.onclick = e => { e.preventDefault();
  const [x, y, s] = a.dataset.box.split(",").map(Number), item = viewer.world.getItemAt(0);
  viewer.viewport.fitBounds(item.imageToViewportRectangle(x, y, s, s)); });
</script></body></html>"""


def _run_arg(data: ViewerData):
    """(name, Run) of the request's ``?run=`` (the default run without one); 404 for an unknown run."""
    name = request.args.get("run")
    try:
        run = data.get_run(name)
    except ViewerError:
        abort(404)
    return name, run


def _query(name: str | None) -> str:
    return "" if name is None else "?" + urlencode({"run": name})


def _columns(rows: dict) -> list[str]:
    first = next(iter(rows.values()), {})
    return [c for c in first if c not in ("slide_id", "slides", "fold")] + (["fold"] if "fold" in first else [])


def overlay_width(data: ViewerData, sid: str) -> float:
    """The overlay's width in viewport units (the slide's width is 1): its pixels times their
    level-0 size, over the slide's width, so tile edges land exactly."""
    from mil.viewer.data import OVERLAY_PX_PER_TILE

    w0 = data.zoom(sid).level_dimensions[-1][0]
    ds = float(data.store.slide_info(sid)["size0"]) / OVERLAY_PX_PER_TILE
    return float(np.ceil(w0 / ds) * ds / w0)


def tile_response(data: ViewerData, sid: str, level: int, col: int, row: int) -> Response:
    """One deep-zoom JPEG tile; the error tile for a slide that cannot be opened; 404 outside the pyramid."""
    import io

    try:
        data.check(sid)
    except ViewerError:
        abort(404)
    try:
        gen = data.zoom(sid)
    except ViewerError as exc:
        return Response(error_tile(str(exc)), mimetype="image/jpeg")
    if not 0 <= level < gen.level_count or not (0 <= col < gen.level_tiles[level][0]
                                                and 0 <= row < gen.level_tiles[level][1]):
        abort(404)
    buf = io.BytesIO()
    gen.get_tile(level, (col, row)).convert("RGB").save(buf, "JPEG", quality=85)
    return Response(buf.getvalue(), mimetype="image/jpeg")


def _areas(data: ViewerData, sid: str) -> dict[str, str]:
    return data.seg.areas(sid) if data.has_seg(sid) else {}


def _seg_columns(data: ViewerData) -> list[str]:
    return [f"{c['name']} mm²" for c in data.seg.classes()]


def slide_page(data: ViewerData, sid: str, name: str | None, run) -> str:
    """A slide's page: the slide, the run's attention (opacity slider, colour bar, top tiles) and
    the class map (opacity slider, legend), each where there is one; the error of a broken slide."""
    error = None
    try:
        w0 = data.zoom(sid).level_dimensions[-1][0]
    except ViewerError as exc:
        error = str(exc)
    overlay = run is not None and error is None
    seg = error is None and data.has_seg(sid)
    cfg = {"dzi": f"../dzi/{sid}.dzi", "overlay": f"../overlay/{sid}.png{_query(name)}" if overlay else None,
           "overlay_width": overlay_width(data, sid) if overlay else 1.0,
           "seg": f"../seg/{sid}.png" if seg else None, "seg_width": data.seg.width(sid, w0) if seg else 1.0}
    title = sid
    if run is not None:
        from mil.heatmap import slide_title

        title = slide_title(run, sid)
    return render_template_string(SLIDE, sid=sid, title=title, error=error, overlay=overlay, q=_query(name),
                                  top=data.top_tiles(sid, run=name) if overlay else [], cfg=json.dumps(cfg),
                                  tiles=data.n_tiles(sid), size0=data.info(sid).get("size0"),
                                  run=None if run is None else str(run.path), seg=seg and str(data.seg.folder),
                                  legend=data.seg.legend() if seg else [])


def create_app(data: ViewerData) -> Flask:
    """The viewer app over *data* (a store, an optional run, the allowed slide folders)."""
    app = Flask(__name__, static_folder=str(STATIC), static_url_path="/static")

    @app.get("/")
    def index():
        name, run = _run_arg(data)
        rows = run_rows(run)
        slides = [{"id": s, "tiles": data.n_tiles(s), "row": {**rows.get(s, {}), **_areas(data, s)}}
                  for s in data.slide_ids()]
        columns = _columns(rows) + (_seg_columns(data) if data.seg is not None else [])
        return render_template_string(INDEX, store=data.title, slides=slides, columns=columns,
                                      tiles=data.store is not None, seg=data.seg and str(data.seg.folder),
                                      run=None if run is None else str(run.path), task=getattr(run, "task", ""),
                                      metrics=summary(run), runs=list(data.runs), name=name, q=_query(name))

    @app.get("/slide/<sid>")
    def slide(sid: str):
        name, run = _run_arg(data)
        try:
            data.check(sid)
        except ViewerError:
            abort(404)
        return slide_page(data, sid, name, run)

    @app.get("/dzi/<sid>.dzi")
    def dzi(sid: str):
        try:
            data.check(sid)
            xml = data.zoom(sid).get_dzi("jpeg")
        except ViewerError as exc:
            log.warning("%s", exc)   # a one-tile image whose only tile is the error tile
            xml = ('<?xml version="1.0" encoding="UTF-8"?><Image xmlns="http://schemas.microsoft.com/deepzoom/2008" '
                   'Format="jpeg" Overlap="0" TileSize="256"><Size Width="256" Height="256"/></Image>')
            if sid not in set(data.slide_ids()):
                abort(404)
        return Response(xml, mimetype="application/xml")

    @app.get("/dzi/<sid>_files/<int:level>/<int:col>_<int:row>.jpeg")
    def tile(sid: str, level: int, col: int, row: int):
        return tile_response(data, sid, level, col, row)

    @app.get("/seg/<sid>.png")
    def seg_png(sid: str):
        try:
            data.check(sid)
            if not data.has_seg(sid):
                abort(404)
            return Response(data.seg.png(sid), mimetype="image/png")
        except ViewerError:
            abort(404)

    @app.get("/overlay/<sid>.png")
    def overlay_png(sid: str):
        name, run = _run_arg(data)
        try:
            data.check(sid)
            size = data.zoom(sid).level_dimensions[-1]
        except ViewerError:
            abort(404)
        if run is None:
            abort(404)
        return Response(data.overlay_png(sid, size, name), mimetype="image/png")

    return app


__all__ = ["create_app", "tile_response", "overlay_width", "ViewerData", "slide_page"]
