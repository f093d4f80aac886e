"""The browser UI in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

Sign in, one card per cluster, rename / merge / split / move through the page (then the API shows each new
revision), names shown as text, and the static gallery opened from disk. Screenshots are saved in the test's
temporary folder."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from curation_testing import NAMES, ClusteringPipeline
from service_testing import CountingEncoderFactory

from cpp import clustering
from cpp.gallery import write_site
from cpp.service.app import create_app
from cpp.service.server import server_config
from cpp.service.settings import Settings

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright is not installed (pip install -e '.[dev]')"
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no system Chromium (Debian: apt-get install chromium; .ci/run installs it)"
)
KEY = "browser-key"
XSS = NAMES[1]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture
def server(settings: Settings) -> Iterator[tuple[str, Settings]]:
    """``cpp serve`` with one API key over a pipeline that leaves a six-cluster clustering."""
    secured = settings.model_copy(update={"api_keys": [KEY]})
    app = create_app(secured, pipeline=ClusteringPipeline(), encoder_factory=CountingEncoderFactory())
    port = _free_port()
    instance = uvicorn.Server(
        server_config(secured, host="127.0.0.1", port=port, log_level="warning", app=app)
    )
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not instance.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", secured
    instance.should_exit = True
    thread.join(10)


@pytest.fixture
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


def _job(base: str, image_root: Path) -> str:
    headers = {"X-API-Key": KEY}
    job = httpx.post(
        f"{base}/v1/jobs",
        json={"source": {"type": "folder", "path": str(image_root / "set")}},
        headers=headers,
    ).json()["id"]
    deadline = time.monotonic() + 20
    while httpx.get(f"{base}/v1/jobs/{job}", headers=headers).json()["status"] != "succeeded":
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(0.05)
    return str(job)


def _clustering(base: str, job: str) -> dict[str, Any]:
    answer = httpx.get(f"{base}/v1/clusterings/{job}", headers={"X-API-Key": KEY})
    assert answer.status_code == 200, answer.text
    data: dict[str, Any] = answer.json()
    return data


def _until(page: Any, expression: str, timeout: float = 10) -> None:
    """Wait until ``expression`` is true in the page (polled with evaluate: the CSP forbids eval)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"never true: {expression}"
        time.sleep(0.05)


def _watch(page: Any) -> list[str]:
    """Page errors, console errors and dialogs (an alert would mean injected script ran)."""
    seen: list[str] = []

    def console(message: Any) -> None:
        if message.type == "error":
            seen.append(f"console: {message.text}")

    def dialog(shown: Any) -> None:
        seen.append(f"dialog: {shown.message}")
        shown.dismiss()

    page.on("pageerror", lambda error: seen.append(f"error: {error}"))
    page.on("console", console)
    page.on("dialog", dialog)
    return seen


def test_curation_through_the_browser(
    server: tuple[str, Settings], browser: Any, image_root: Path, tmp_path: Path
) -> None:
    base, _ = server
    job = _job(base, image_root)
    page = browser.new_page(viewport={"width": 1360, "height": 900})
    problems = _watch(page)
    shots = tmp_path / "screenshots"
    shots.mkdir()

    page.goto(f"{base}/")
    page.wait_for_selector("#api-key")
    page.screenshot(path=str(shots / "login.png"))
    page.fill("#api-key", KEY)
    page.click("button[type=submit]")
    page.wait_for_selector("text=Open clusters")
    assert problems == [
        "console: Failed to load resource: the server responded with a status of 401 (Unauthorized)"
    ]
    problems.clear()  # the jobs list asked before signing in
    page.screenshot(path=str(shots / "jobs.png"))

    page.click("text=Open clusters")
    page.wait_for_selector(".card")
    assert page.locator(".card").count() == 6
    assert page.locator(".card .name", has_text=XSS).count() == 1  # shown as text
    assert page.locator("img[src=x]").count() == 0
    _until(page, "[...document.images].every((i) => i.complete)")
    assert page.evaluate("[...document.querySelectorAll('.mosaic img')].every((i) => i.naturalWidth > 0)")
    page.screenshot(path=str(shots / "overview.png"), full_page=True)

    # rename cluster 0
    page.click(".card[data-cluster='0'] .name")
    page.wait_for_selector("#rename-input")
    page.screenshot(path=str(shots / "cluster.png"), full_page=True)
    page.fill("#rename-input", "felines")
    page.click("#rename")
    page.wait_for_selector("#cluster-name:text-is('felines')")
    info = _clustering(base, job)
    assert info["revision"] == 1 and info["clusters"][0]["name"] == "felines"

    # merge clusters 1 and 2
    page.click("text=‹ All clusters")
    page.wait_for_selector(".card")
    page.check(".card[data-cluster='1'] input[type=checkbox]")
    page.check(".card[data-cluster='2'] input[type=checkbox]")
    page.click("#merge-selected")
    page.wait_for_selector("#cluster-name")
    info = _clustering(base, job)
    assert info["revision"] == 2 and len(info["clusters"]) == 5
    assert info["clusters"][1]["size"] == 24

    # split the merged cluster into two
    page.fill("#split-parts", "2")
    page.click("#split")
    page.wait_for_selector(".card")
    _until(page, "document.querySelectorAll('.card').length === 6")
    info = _clustering(base, job)
    assert info["revision"] == 3 and sorted(c["size"] for c in info["clusters"]) == [12] * 6

    # move two images of cluster 3 to cluster 0
    page.click(".card[data-cluster='3'] .name")
    page.wait_for_selector(".tile")
    page.click(".tile >> nth=0")
    page.click(".tile >> nth=1")
    page.select_option("#move-target", "0")
    page.screenshot(path=str(shots / "selection.png"), full_page=True)
    page.click("#move")
    page.wait_for_selector("text=10 images")
    info = _clustering(base, job)
    assert info["revision"] == 4 and info["clusters"][0]["size"] == 14 and info["clusters"][3]["size"] == 10

    page.goto(f"{base}/#/c/{job}/map")
    page.wait_for_selector("canvas#map")
    page.screenshot(path=str(shots / "map.png"), full_page=True)
    page.goto(f"{base}/#/c/{job}/run")
    page.wait_for_selector(".curve")
    page.screenshot(path=str(shots / "run.png"), full_page=True)
    assert page.locator(".edits li").count() == 4
    assert problems == []
    assert all(
        (shots / f"{name}.png").stat().st_size > 5000 for name in ("overview", "cluster", "map", "run")
    )


def test_static_gallery_opens_from_disk(
    server: tuple[str, Settings], browser: Any, image_root: Path, tmp_path: Path
) -> None:
    base, settings = server
    job = _job(base, image_root)
    site = tmp_path / "site"
    counts = write_site(clustering.open(settings.jobs_dir / job), site)
    assert counts == {"clusters": 6, "thumbnails": 72, "failed": 0}
    page = browser.new_page(viewport={"width": 1360, "height": 900})
    problems = _watch(page)
    page.goto((site / "index.html").as_uri())
    page.wait_for_selector(".card")
    assert page.locator(".card").count() == 6
    assert page.locator(".card .name", has_text=XSS).count() == 1
    _until(page, "[...document.images].every((i) => i.complete)")
    assert page.evaluate("[...document.querySelectorAll('.mosaic img')].every((i) => i.naturalWidth > 0)")
    assert page.locator("#rename-input").count() == 0
    page.screenshot(path=str(tmp_path / "static-overview.png"), full_page=True)
    page.click(f".card .name:text-is('{XSS}')")
    page.wait_for_selector(".tile")
    assert page.locator("#cluster-name").inner_text() == XSS
    assert page.locator("#rename-input").count() == 0  # read only
    page.screenshot(path=str(tmp_path / "static-cluster.png"), full_page=True)
    assert problems == []
