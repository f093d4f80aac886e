"""A scripted pipeline whose jobs leave a real clustering artifact (synthetic features, PNGs in the job's
folder), for the curation API and browser UI tests."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from service_testing import FakePipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clusterings import make_clustering

from cpp.options import ClusterOptions, SourceSpec
from cpp.result import ClusterResult

NAMES = [
    "tabby cat",
    "<img src=x onerror=alert(1)>",
    "golden retriever",
    "night sky",
    "sports car",
    "sunflower",
]


class ClusteringPipeline(FakePipeline):
    """Each job writes a clustering of ``k`` clusters of ``per`` images (named from :data:`NAMES`)."""

    def __init__(self, k: int = 6, per: int = 12) -> None:
        super().__init__(batches=1)
        self.k, self.per = k, per

    def run_cluster(
        self, source: SourceSpec, options: ClusterOptions, work_dir: str | Path, **kwargs: Any
    ) -> ClusterResult:
        work = Path(work_dir)
        names = [NAMES[j % len(NAMES)] + ("" if j < len(NAMES) else f" {j}") for j in range(self.k)]
        return make_clustering(work / "source", k=self.k, per=self.per, names=names, work=work).result()
