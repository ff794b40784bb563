"""The metrics port: ``/metrics`` (Prometheus) and a live dashboard page (``/``, ``/dashboard``).

The page is one HTML file with inline CSS and JS and no external assets, so it
works offline: it polls ``/dashboard/data`` (the monitor's samples, as JSON)
every second and draws throughput over time on a canvas, per-dataset and
per-stream rates, worker busy %, queue depth, build-time percentiles, and the
data wait trainers report (``StreamBatchesRequest.trainer_report``).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

if TYPE_CHECKING:
    from batchwire.server.metrics import Pages
    from batchwire.server.monitor import Monitor


class DashboardPages:
    """The dashboard's paths, over one monitor."""

    def __init__(self, monitor: Monitor) -> None:
        self._monitor = monitor

    def page(self, path: str) -> tuple[str, bytes] | None:
        if path in ("/", "/dashboard"):
            return "text/html; charset=utf-8", PAGE.encode()
        if path == "/dashboard/data":
            return "application/json", json.dumps(self._monitor.data()).encode()
        return None


def start_http(
    host: str, port: int, registry: CollectorRegistry, pages: Pages | None
) -> ThreadingHTTPServer:
    """Serves /metrics and ``pages`` on a daemon thread; raises OSError if the port is taken."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                found: tuple[str, bytes] | None = (CONTENT_TYPE_LATEST, generate_latest(registry))
            else:
                found = pages.page(path) if pages is not None else None
            if found is None:
                self.send_error(404, f"no page {path}; try /metrics or /dashboard")
                return
            kind, body = found
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # one line per scrape would drown the serve log

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="batchwire-metrics", daemon=True).start()
    return server


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>batchwire server</title>
<style>
body{font:14px system-ui,sans-serif;margin:16px;background:#fafafa;color:#222}
h1{font-size:18px;margin:0 0 12px}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin-bottom:12px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px 12px;min-width:140px}
.card b{display:block;font-size:22px}
canvas{background:#fff;border:1px solid #ddd;border-radius:6px}
table{border-collapse:collapse;background:#fff;margin-top:8px}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f0f0f0}
#status{color:#888;font-size:12px}
</style></head><body>
<h1>batchwire server <span id="status">connecting...</span></h1>
<div class="cards">
<div class="card">throughput<b id="throughput">-</b><span id="mbps">-</span></div>
<div class="card">workers busy<b id="busy">-</b><span id="workers">-</span></div>
<div class="card">queue depth<b id="queue">-</b><span id="streams">-</span></div>
<div class="card">build time<b id="p50">-</b><span id="p90p99">-</span></div>
<div class="card">waiting on workers<b id="wait">-</b>stream-s per s</div>
</div>
<canvas id="chart" width="900" height="220"></canvas>
<h2 style="font-size:15px">datasets (batches/s, last sample)</h2>
<table id="datasets"><tr><th>dataset</th><th>batches/s</th></tr></table>
<h2 style="font-size:15px">trainers: data wait (share of step time, as reported for their last pass)</h2>
<table id="trainers"><tr><th>dataset</th><th>data wait</th><th>reports</th></tr></table>
<h2 style="font-size:15px">open streams</h2>
<table id="open"><tr><th>stream</th><th>dataset</th><th>transport</th><th>batches</th>
<th>MB</th><th>batches/s</th><th>waited on workers (s)</th><th>queue</th></tr></table>
<script>
"use strict";
function fmt(v, d){ return (v === null || v === undefined) ? "-" : v.toFixed(d); }
function ms(v){ return (v === null || v === undefined) ? "-" : (v * 1000).toFixed(1) + " ms"; }
function rows(table, header, items){
  while (table.rows.length > 1) table.deleteRow(1);
  for (const cells of items){
    const row = table.insertRow();
    for (const c of cells){ row.insertCell().textContent = c; }
  }
}
function draw(samples){
  const c = document.getElementById("chart"), g = c.getContext("2d");
  g.clearRect(0, 0, c.width, c.height);
  const ys = samples.map(s => s.batches_per_s), busy = samples.map(s => s.busy_fraction);
  const top = Math.max(1, ...ys) * 1.1, n = Math.max(ys.length - 1, 1);
  g.fillStyle = "#666"; g.font = "12px sans-serif";
  g.fillText("batches/s (blue, max " + top.toFixed(0) + ")   workers busy % (orange)", 8, 14);
  const line = (vals, scale, color) => {
    g.strokeStyle = color; g.lineWidth = 2; g.beginPath();
    vals.forEach((v, i) => {
      const x = 8 + (c.width - 16) * i / n, y = c.height - 8 - (c.height - 30) * v / scale;
      if (i) g.lineTo(x, y); else g.moveTo(x, y);
    });
    g.stroke();
  };
  line(ys, top, "#1f77b4"); line(busy, 1, "#ff7f0e");
}
function lastWith(samples, key){
  for (let i = samples.length - 1; i >= 0; i--) if (samples[i][key] !== null) return samples[i][key];
  return null;
}
async function tick(){
  try {
    const r = await fetch("/dashboard/data", {cache: "no-store"});
    const d = await r.json(), s = d.samples, last = s.length ? s[s.length - 1] : null;
    const w = d.window;
    document.getElementById("throughput").textContent = w ? fmt(w.batches_per_s, 1) + " batches/s" : "-";
    document.getElementById("mbps").textContent = w ? fmt(w.bytes_per_s / 1e6, 2) + " MB/s (30 s)" : "-";
    document.getElementById("busy").textContent = last ? fmt(last.busy_fraction * 100, 0) + " %" : "-";
    document.getElementById("workers").textContent = last ? last.workers + " workers alive" : "-";
    document.getElementById("queue").textContent = last ? fmt(last.queue_depth, 0) : "-";
    document.getElementById("streams").textContent = last ? last.streams + " open streams" : "-";
    document.getElementById("p50").textContent = "p50 " + ms(lastWith(s, "build_p50"));
    document.getElementById("p90p99").textContent = "p90 " + ms(lastWith(s, "build_p90")) + " p99 " + ms(lastWith(s, "build_p99"));
    document.getElementById("wait").textContent = last ? fmt(last.worker_wait_per_s, 2) : "-";
    rows(document.getElementById("datasets"), null,
         last ? Object.entries(last.datasets).sort().map(([k, v]) => [k, fmt(v, 1)]) : []);
    rows(document.getElementById("trainers"), null, Object.entries(d.trainers).map(
         ([k, v]) => [k, fmt(v.data_wait_fraction * 100, 0) + " %", v.reports]));
    rows(document.getElementById("open"), null, d.streams.map(t => [t.stream, t.dataset,
         t.transport + (t.compression !== "none" ? "+" + t.compression : ""), t.batches,
         fmt(t.bytes / 1e6, 2), fmt(t.batches_per_s, 1), fmt(t.worker_wait_seconds, 2), t.queue_depth]));
    draw(s);
    document.getElementById("status").textContent = "updated " + new Date().toLocaleTimeString();
    document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
  } catch (e) {
    document.getElementById("status").textContent = "cannot reach the server: " + e;
  }
}
tick(); setInterval(tick, 1000);
</script></body></html>
"""
