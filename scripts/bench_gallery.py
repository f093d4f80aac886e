"""Gallery benchmark: the overview of a 1,000-cluster, 100,000-image clustering, served by the UI's API.

Builds a synthetic clustering (features, readout, revision 0, assignments in JSONL; no image files, so no
thumbnails are made: the figure is the page before its lazy-loaded thumbnails), serves it with ``cpp
serve``'s app on loopback, and measures what a browser opening the overview fetches: the page, its script
and style, and one overview page of cluster cards (60 by default, as the UI asks). Prints JSON:

- ``build_s``: time to write the synthetic clustering (not part of the target);
- ``overview_ms``: latency of ``GET /v1/clusterings/{id}/overview`` (the first request after start, which
  reads the store index and sorts the members, and the median of the warm ones), plus the same call in
  process;
- ``transfer_bytes``: bytes of the page, script, style and overview JSON (the UI's first screen), and of the
  largest overview page the API serves (500 cards);
- ``edit_ms``: one rename (a new revision: labels, clusters and the 100,000-line assignments rewritten).

Usage: ``python scripts/bench_gallery.py [--clusters 1000] [--per 100]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "service"))
from clusterings import make_clustering
from loopback import free_port
from service_testing import CountingEncoderFactory, FakePipeline

from cpp import clustering, gallery
from cpp.result import ClusterResult
from cpp.service.app import create_app
from cpp.service.server import server_config
from cpp.service.settings import Settings


class SyntheticPipeline(FakePipeline):
    """A job that leaves the synthetic clustering in its folder."""

    def __init__(self, clusters: int, per: int, timings: dict[str, float]) -> None:
        super().__init__(batches=1)
        self.clusters, self.per, self.timings = clusters, per, timings

    def run_cluster(self, source: Any, options: Any, work_dir: str | Path, **kwargs: Any) -> ClusterResult:
        started = time.perf_counter()
        work = Path(work_dir)
        made = make_clustering(work / "source", k=self.clusters, per=self.per, d=32, images=False, work=work)
        self.timings["build_s"] = round(time.perf_counter() - started, 2)
        return made.result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--per", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-gallery-"))
    (root / "images").mkdir()
    timings: dict[str, float] = {}
    settings = Settings(
        data_dir=root / "data", allowed_roots=[root / "images"], model="synthetic", devices=["cpu"]
    )
    app = create_app(
        settings,
        pipeline=SyntheticPipeline(args.clusters, args.per, timings),
        encoder_factory=CountingEncoderFactory(),
    )
    port = free_port()
    server = uvicorn.Server(
        server_config(settings, host="127.0.0.1", port=port, log_level="warning", app=app)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=120) as client:
        job = client.post(
            "/v1/jobs", json={"source": {"type": "folder", "path": str(root / "images")}}
        ).json()
        while client.get(f"/v1/jobs/{job['id']}").json()["status"] not in ("succeeded", "failed"):
            time.sleep(0.2)
        overview = f"/v1/clusterings/{job['id']}/overview"

        def timed(path: str) -> tuple[float, int]:
            started = time.perf_counter()
            answer = client.get(path)
            assert answer.status_code == 200, answer.text
            return (time.perf_counter() - started) * 1000, len(answer.content)

        first_ms, page_bytes = timed(overview)
        warm = [
            timed(f"{overview}?sort={s}")[0]
            for s in ("size", "score", "uncertain", "name") * (args.repeats // 4)
        ]
        filtered_ms = statistics.median(timed(f"{overview}?q=cluster%2099")[0] for _ in range(5))
        shell = {
            name: timed(path)[1]
            for name, path in (("html", "/"), ("js", "/ui/app.js"), ("css", "/ui/style.css"))
        }
        _, largest = timed(f"{overview}?limit=500")
        opened = clustering.open(settings.jobs_dir / job["id"])
        started = time.perf_counter()
        gallery.overview(opened)
        in_process_ms = (time.perf_counter() - started) * 1000
        token = client.cookies.get("cpp_csrf") or ""  # set when the page was fetched
        started = time.perf_counter()
        renamed = client.post(
            f"/v1/clusterings/{job['id']}/clusters/0/rename",
            json={"name": "renamed"},
            headers={"X-CSRF-Token": token},
        )
        edit_ms = (time.perf_counter() - started) * 1000
        assert renamed.status_code == 200, renamed.text
        after_edit_ms, _ = timed(overview)
    server.should_exit = True
    thread.join(10)
    print(
        json.dumps(
            {
                "clusters": args.clusters,
                "images": args.clusters * args.per,
                **timings,
                "overview_ms": {
                    "first": round(first_ms, 1),
                    "warm_median": round(statistics.median(warm), 1),
                    "warm_max": round(max(warm), 1),
                    "filtered_median": round(filtered_ms, 1),
                    "in_process_warm": round(in_process_ms, 1),
                    "first_after_edit": round(after_edit_ms, 1),
                },
                "transfer_bytes": {
                    **shell,
                    "overview_page_60": page_bytes,
                    "first_screen_total": page_bytes + sum(shell.values()),
                    "overview_page_500": largest,
                },
                "edit_ms": {"rename": round(edit_ms, 1)},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
