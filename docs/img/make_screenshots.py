"""Redraw the MLflow UI screenshots of docs/tracking.md (mlflow-runs.png, mlflow-run.png).

    python docs/img/make_screenshots.py [--out docs/img]

Trains two tiny quickstart runs (PGD-AT and plain training, 2 epochs each, CPU, about half a
minute) into a throw-away SQLite store, starts ``mlflow server`` on a free 127.0.0.1 port and
photographs the runs table and one run's page with headless Chromium, driven through the
DevTools protocol (``aiohttp``, which MLflow installs) so that the MLflow Assistant panel,
which MLflow 3.17 opens on a first visit to a local server, can be closed first; everything
else is what a user sees on opening artplug's links. Needs ``chromium`` on the PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WIDTH, HEIGHT = 1400, 900
# JavaScript run in the page before the picture: close the assistant side panel if it is open.
CLOSE_ASSISTANT = """
(() => {
  const b = document.querySelector('[data-component-id="mlflow.assistant.chat_panel.close"]');
  if (b) { b.click(); return true; }
  return false;
})()
"""
# On the run page: type "test/" into the metrics table's search box (React reads the value
# through the native setter and an input event), so that the picture shows the test metrics.
FILTER_TEST_METRICS = """
(() => {
  const box = [...document.querySelectorAll('input')]
    .find((i) => (i.placeholder || '').toLowerCase().includes('search metrics'));
  if (!box) return false;
  const set = Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set;
  set.call(box, 'test/');
  box.dispatchEvent(new Event('input', { bubbles: true }));
  return true;
})()
"""


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout_s: float = 90.0) -> None:
    """Wait until ``url`` answers 200."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s")


async def _shoot(port: int, pages: list[tuple[str, Path, int, str, str | None]]) -> None:
    """Photograph each ``(url, out, height, ready text, script)``: once the page shows the
    text, the assistant panel is closed, ``script`` (if any) runs, and the picture is taken."""
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.put(f"http://127.0.0.1:{port}/json/new?about:blank") as reply:
            target = await reply.json(content_type=None)
        async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            counter = 0

            async def call(method: str, **params: object) -> dict[str, object]:
                nonlocal counter
                counter += 1
                await ws.send_json({"id": counter, "method": method, "params": params})
                while True:
                    message = await ws.receive_json()
                    if message.get("id") == counter:
                        if "error" in message:
                            raise RuntimeError(f"{method}: {message['error']}")
                        result: dict[str, object] = message.get("result", {})
                        return result

            await call("Page.enable")
            for url, out, height, ready, script in pages:
                await call(
                    "Emulation.setDeviceMetricsOverride",
                    width=WIDTH,
                    height=height,
                    deviceScaleFactor=1,
                    mobile=False,
                )
                await call("Page.navigate", url=url)
                test = f"document.body.innerText.includes({json.dumps(ready)})"
                for _ in range(120):  # the UI loads its chunks, then the runs: up to a minute
                    answer = await call("Runtime.evaluate", expression=test, returnByValue=True)
                    result = answer.get("result")
                    if isinstance(result, dict) and result.get("value") is True:
                        break
                    await asyncio.sleep(0.5)
                else:
                    raise TimeoutError(f"{url} never showed {ready!r}")
                await asyncio.sleep(2)  # the last columns and widths settle
                await call("Runtime.evaluate", expression=CLOSE_ASSISTANT)
                if script is not None:
                    await call("Runtime.evaluate", expression=script)
                await asyncio.sleep(2)
                shot = await call("Page.captureScreenshot", format="png")
                out.write_bytes(base64.b64decode(str(shot["data"])))
                print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")


def make_store(folder: Path) -> tuple[str, list[str]]:
    """Two tiny runs in a new SQLite store in ``folder``: its URI and the run ids."""
    import artplug

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    ids = []
    for name, perturbation, sanity in (("pgd", "pgd", True), ("standard", "none", False)):
        result = artplug.train(
            ROOT / "recipes" / "quickstart.toml",
            overrides={
                "run.name": f"quickstart-{name}",
                "run.epochs": 2,
                "run.out_dir": str(folder / "runs"),
                "perturbation": {"use": perturbation},
                "eval.test_examples": 100,
                "eval.sanity": sanity,
                "eval.sanity_examples": 50,
                "tracking.log_model": False,
            },
            tracking_uri=uri,
            threads=1,
            quiet=True,
        )
        assert result.run_id is not None
        ids.append(result.run_id)
    return uri, ids


def main() -> None:
    """Parse the options, make the store, serve it, take the pictures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium is not installed (apt-get install chromium)")
    from artplug.tracking import ui_links

    with tempfile.TemporaryDirectory(prefix="artplug-ui-") as scratch:
        folder = Path(scratch)
        uri, run_ids = make_store(folder)
        port, devtools = free_port(), free_port()
        base = f"http://127.0.0.1:{port}"
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        serve = ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, *serve],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # its own process group: its workers stop with it
        )
        browser = None
        try:
            wait_http(f"{base}/health")
            browser = subprocess.Popen(
                [
                    chromium,
                    *("--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"),
                    f"--remote-debugging-port={devtools}",
                    f"--user-data-dir={folder / 'chrome'}",
                    f"--window-size={WIDTH},{HEIGHT}",
                    "about:blank",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            wait_http(f"http://127.0.0.1:{devtools}/json/version")
            import mlflow

            experiment_id = mlflow.MlflowClient(uri).get_run(run_ids[0]).info.experiment_id
            run_link, table = ui_links(base, experiment_id, run_ids[0])
            args.out.mkdir(parents=True, exist_ok=True)
            asyncio.run(
                _shoot(
                    devtools,
                    [
                        (table, args.out / "mlflow-runs.png", 420, "quickstart-pgd", None),
                        (run_link, args.out / "mlflow-run.png", 900, "worst", FILTER_TEST_METRICS),
                    ],
                )
            )
            print(json.dumps({"runs": table, "run": run_link}))
        finally:
            if browser is not None:
                browser.terminate()
                browser.wait(timeout=30)
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
