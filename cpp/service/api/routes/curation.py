"""``/v1/clusterings/{id}/...``: what the browser UI shows of a clustering, its thumbnails and exports,
and the curation edits (rename, merge, move, split, outliers, restore), each committing a new revision.

Same authentication as the rest of ``/v1``; edits made with the UI's session cookie, and every edit on a
service without keys, must pass the CSRF check (:func:`cpp.service.api.deps.check_csrf`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, Header, Path, Query, Request
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from cpp import curation, export, gallery
from cpp.clustering import Clustering, ClusteringError
from cpp.curation import CurationError, Outcome, RevisionConflict
from cpp.gallery import GalleryError
from cpp.result import Edit
from cpp.service.api.deps import CSRF_HEADER, SettingsDep, check_csrf
from cpp.service.api.routes.clusterings import ClusteringDep
from cpp.service.problems import ApiProblem, problem_responses
from cpp.sources import confine_roots
from cpp.thumbnails import ThumbnailError, Thumbnails

router = APIRouter(prefix="/clusterings/{clustering_id}", tags=["curation"])

_READ = problem_responses(401, 404, 409, 422)
_EDIT = problem_responses(400, 401, 403, 404, 409, 422)
T = TypeVar("T")

ClusterId = Annotated[int, Path(ge=-1, le=1_000_000, description="Cluster id in the newest revision")]
Offset = Annotated[int, Query(ge=0, le=10**9)]
#: A cluster id or an image row in an edit's body.
ClusterRef = Annotated[int, Field(ge=0, le=1_000_000)]
Row = Annotated[int, Field(ge=0, le=10**9)]
Limit = Annotated[int, Query(ge=1, le=500)]
Expected = Field(
    default=None, ge=0, description="The revision the edit was made against: 409 if the clustering moved on."
)


def csrf_for_browsers(
    request: Request,
    token: Annotated[
        str | None,
        Header(alias=CSRF_HEADER, description="The cpp_csrf cookie's value, for requests without an API key"),
    ] = None,
) -> None:
    """Edits without an API-key header (the UI's cookie, or a service without keys) need the CSRF token."""
    if "authorization" not in request.headers and "x-api-key" not in request.headers:
        check_csrf(request)


def _answer(call: Callable[[], T]) -> T:
    """Run a library call, turning its user errors into problems."""
    try:
        return call()
    except RevisionConflict as exc:
        raise ApiProblem(409, "revision-conflict", "Revision conflict", str(exc)) from None
    except (CurationError, GalleryError, ClusteringError, export.ExportError) as exc:
        raise ApiProblem(422, "bad-edit", "Request not possible", str(exc)) from None


def _existing(found: Clustering, cluster: int, *, outliers: bool = False) -> None:
    """404 for a cluster id the newest revision does not have (-1, the outliers, only if ``outliers``)."""
    count = len(found.state().clusters)
    if not (0 <= cluster < count or (outliers and cluster == -1)):
        raise ApiProblem(
            404,
            "not-found",
            "Cluster not found",
            f"cluster {cluster} does not exist; clusters are 0..{count - 1}",
        )


# ------------------------------------------------------------------------------------------------ views


@router.get("/overview", summary="Cluster cards of the newest revision", responses=_READ)
def get_overview(
    found: ClusteringDep,
    sort: Annotated[Literal["size", "score", "uncertain", "name"], Query()] = "size",
    descending: Annotated[bool | None, Query(description="Default: true, false for names")] = None,
    q: Annotated[str, Query(max_length=200, description="Only clusters whose name contains this")] = "",
    offset: Offset = 0,
    limit: Limit = 60,
) -> dict[str, Any]:
    """A page of clusters: name, size, score, uncertain, and the rows of 10 representative thumbnails."""
    return _answer(
        lambda: gallery.overview(found, sort=sort, descending=descending, q=q, offset=offset, limit=limit)
    )


@router.get("/clusters/{cluster}", summary="A cluster and a page of its members", responses=_READ)
def get_cluster(
    found: ClusteringDep, cluster: ClusterId, offset: Offset = 0, limit: Limit = 60
) -> dict[str, Any]:
    """The cluster (-1: the outliers), its alternative names, and its members by confidence."""
    _existing(found, cluster, outliers=True)
    return _answer(lambda: gallery.cluster_page(found, cluster, offset=offset, limit=limit))


@router.get("/map", summary="2-D map of the collection", responses=_READ)
def get_map(found: ClusteringDep) -> dict[str, Any]:
    """Up to 20,000 members as integer coordinates (0..1000) with their clusters (made once, then stored)."""
    return _answer(lambda: gallery.map_view(found))


@router.get("/run", summary="How the clustering was made", responses=_READ)
def get_run(found: ClusteringDep) -> dict[str, Any]:
    """Encoder, head, fit, timings, skipped files, the coding length of each K, and the edits."""
    return _answer(lambda: gallery.run_view(found))


class RevisionSummary(BaseModel):
    revision: int
    created_at: str
    edit: Edit | None
    clusters: int


@router.get("/revisions", summary="The revisions of the clustering", responses=_READ)
def get_revisions(found: ClusteringDep) -> list[RevisionSummary]:
    """Every revision, oldest first, with the edit that made it."""
    states = [found.state(n) for n in found.revisions()]
    return [
        RevisionSummary(revision=s.revision, created_at=s.created_at, edit=s.edit, clusters=len(s.clusters))
        for s in states
    ]


_thumbnailers: OrderedDict[tuple[str, str], Thumbnails] = OrderedDict()
_thumbnailers_lock = threading.Lock()


def _thumbnails(found: Clustering, settings: SettingsDep) -> Thumbnails:
    """One thumbnailer per clustering (it caches its source listing), reading under the allowed roots and
    the job's own folder only."""
    key = (str(found.path), found.id)
    with _thumbnailers_lock:
        thumbnails = _thumbnailers.get(key)
        if thumbnails is None:
            thumbnails = Thumbnails(found, confine_roots([*settings.allowed_roots, found.path]))
            _thumbnailers[key] = thumbnails
            while len(_thumbnailers) > 8:
                _thumbnailers.popitem(last=False)
        else:
            _thumbnailers.move_to_end(key)
    return thumbnails


@router.get(
    "/thumbnails/{row}",
    summary="Thumbnail of one image of the clustering",
    response_class=FileResponse,
    responses={200: {"content": {"image/jpeg": {}}}, **_READ},
)
def get_thumbnail(
    found: ClusteringDep,
    settings: SettingsDep,
    row: Annotated[int, Path(ge=0, le=10**9, description="The image's row in the clustering")],
) -> FileResponse:
    """A JPEG of at most 256 pixels a side; only images of this clustering exist here (by row)."""
    try:
        path = _thumbnails(found, settings).path(row)
    except ThumbnailError as exc:
        raise ApiProblem(404, "image-unavailable", "Image not available", str(exc)) from None
    return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})


@router.get(
    "/export",
    summary="Export the newest revision",
    response_class=Response,
    responses={200: {"content": {t: {} for t in dict.fromkeys(export.MEDIA_TYPES.values())}}, **_READ},
)
def get_export(
    clustering_id: str,
    found: ClusteringDep,
    format: Annotated[Literal["json", "csv", "coco"], Query(description="json, csv or coco")] = "json",
) -> Response:
    """The result JSON (assignments inline), a CSV (path, key, cluster, name, confidence) or COCO-style
    image-level labels, as a download. (Folders of symlinks: ``cpp export --format folders``.)"""
    data = _answer(lambda: export.render(found, format))
    extension = "csv" if format == "csv" else "json"
    name = f"clustering-{clustering_id}-r{found.revision}-{format}.{extension}"
    return Response(
        data,
        media_type=export.MEDIA_TYPES[format],
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


# ------------------------------------------------------------------------------------------------ edits


class EditResult(BaseModel):
    revision: int = Field(description="The revision the edit made.")
    clusters: list[int] = Field(description="Ids, in the new revision, of the clusters it made or changed.")


def _edited(call: Callable[[], Outcome]) -> EditResult:
    outcome = _answer(call)
    return EditResult(revision=outcome.revision, clusters=outcome.clusters)


class RenameRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(
        min_length=1,
        max_length=curation.MAX_NAME_CHARS,
        description="Free text or an alternative; stored with runs of whitespace collapsed to one space. "
        "It must hold a printable character and no control or format characters (Unicode Cc, Cf).",
    )
    expected_revision: int | None = Expected


class MergeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    clusters: list[ClusterRef] = Field(
        min_length=2, max_length=10_000, description="Merged into the first one."
    )
    name: str | None = Field(default=None, min_length=1, max_length=curation.MAX_NAME_CHARS)
    expected_revision: int | None = Expected


class MoveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rows: list[Row] = Field(min_length=1, max_length=100_000, description="Rows of the images to move.")
    to: ClusterRef = Field(description="Target cluster.")
    expected_revision: int | None = Expected


class SplitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    parts: int = Field(ge=2, le=curation.MAX_SPLIT)
    expected_revision: int | None = Expected


class OutlierRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rows: list[Row] = Field(min_length=1, max_length=100_000)
    expected_revision: int | None = Expected


class RestoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    revision: int = Field(ge=0)
    expected_revision: int | None = Expected


#: The edits: a CSRF check for browsers, and their problem answers.
edits = APIRouter(dependencies=[Depends(csrf_for_browsers)], responses=_EDIT)


@edits.post("/clusters/{cluster}/rename", summary="Rename a cluster")
def post_rename(found: ClusteringDep, cluster: ClusterId, body: RenameRequest) -> EditResult:
    _existing(found, cluster)
    return _edited(lambda: curation.rename(found, cluster, body.name, expected=body.expected_revision))


@edits.post("/merge", summary="Merge clusters")
def post_merge(found: ClusteringDep, body: MergeRequest) -> EditResult:
    return _edited(
        lambda: curation.merge(found, body.clusters, name=body.name, expected=body.expected_revision)
    )


@edits.post("/move", summary="Move images to another cluster")
def post_move(found: ClusteringDep, body: MoveRequest) -> EditResult:
    return _edited(lambda: curation.move(found, body.rows, body.to, expected=body.expected_revision))


@edits.post("/clusters/{cluster}/split", summary="Split a cluster")
def post_split(found: ClusteringDep, cluster: ClusterId, body: SplitRequest) -> EditResult:
    """Re-run the readout's clustering on the cluster's members, into ``parts`` clusters."""
    _existing(found, cluster)
    return _edited(lambda: curation.split(found, cluster, body.parts, expected=body.expected_revision))


@edits.post("/outliers", summary="Mark images as outliers")
def post_outliers(found: ClusteringDep, body: OutlierRequest) -> EditResult:
    return _edited(lambda: curation.mark_outliers(found, body.rows, expected=body.expected_revision))


@edits.post("/restore", summary="Restore a revision")
def post_restore(found: ClusteringDep, body: RestoreRequest) -> EditResult:
    """A new revision with the state of an earlier one."""
    return _edited(lambda: curation.restore(found, body.revision, expected=body.expected_revision))


router.include_router(edits)
