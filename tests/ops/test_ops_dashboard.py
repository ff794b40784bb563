"""Issue 16 acceptance 2: the live dashboard in a real headless browser (Debian chromium).

The page loads from the metrics port alone (no external assets), updates while
a stream runs, and shows non-zero throughput; its screenshot is kept under
tests/artifacts/ (gitignored) and the test's tmp dir.
"""

from __future__ import annotations

import re
import shutil
import threading
from pathlib import Path

from _serverproc import ServerProcess, free_port
from test_ops_health import write_config
from webdriver import Browser, require_or_skip

from batchwire.client import RemoteDataset
from batchwire.server.dashboard import PAGE

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


def test_the_page_has_no_external_assets() -> None:
    assert not re.search(r"(src|href)\s*=", PAGE)
    assert "http://" not in PAGE and "https://" not in PAGE and "@import" not in PAGE


def _stream_until(target: str, stop: threading.Event, counted: list[int]) -> None:
    ds = RemoteDataset(target, "dict", batch_size=4)
    while not stop.is_set():
        for _ in ds:
            counted[0] += 1
            if stop.is_set():
                return


def test_dashboard_updates_live_in_a_headless_browser(tmp_path: Path) -> None:
    require_or_skip()
    metrics_port = free_port()
    # 10 ms per item: a stream runs for seconds, long enough to watch.
    config = write_config(tmp_path, item_seconds=0.01)
    with ServerProcess(config, workers=2, extra=["--metrics-port", str(metrics_port)]) as server:
        stop, counted = threading.Event(), [0]
        streamer = threading.Thread(target=_stream_until, args=(server.target, stop, counted))
        streamer.start()
        try:
            with Browser() as browser:
                browser.open(f"http://127.0.0.1:{metrics_port}/dashboard")
                assert browser.run("return document.title") == "batchwire server"
                seen = _wait_for(
                    browser,
                    "const t = document.getElementById('throughput').textContent;"
                    "const u = Number(document.body.dataset.updates || 0);"
                    "return (parseFloat(t) > 0 && u >= 3"
                    " && document.getElementById('open').rows.length > 1) ? [t, u] : null;",
                )
                throughput, updates = seen
                assert float(throughput.split()[0]) > 0
                shot = browser.screenshot()
                # Still live: the update count keeps growing while the stream runs.
                later = _wait_for(
                    browser,
                    f"const u = Number(document.body.dataset.updates || 0); return u > {updates} ? u : null;",
                )
                assert later > updates
                datasets = browser.run(
                    "return document.getElementById('datasets').rows[1].cells[0].textContent"
                )
                assert datasets == "dict"
                # Each finished pass reports its data wait with the next pass's request.
                trainers = _wait_for(
                    browser,
                    "const t = document.getElementById('trainers');"
                    "return t.rows.length > 1 ? t.rows[1].cells[0].textContent : null;",
                )
                assert trainers == "dict"
        finally:
            stop.set()
            streamer.join(timeout=120)
    assert counted[0] > 0
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 10_000
    (tmp_path / "dashboard.png").write_bytes(shot)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(tmp_path / "dashboard.png", ARTIFACTS / "dashboard.png")


def _wait_for(browser: Browser, script: str, seconds: float = 90.0):
    import time

    deadline = time.monotonic() + seconds
    while True:
        value = browser.run(script)
        if value:
            return value
        assert time.monotonic() < deadline, browser.run(
            "return document.body.innerText.slice(0, 2000)"
        )
        time.sleep(0.25)
