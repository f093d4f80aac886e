"""The Ray engine: units embedded by Ray Data actors, on this machine or across a Ray cluster.

The driver (this process) turns the planned units into a Ray dataset with one row, and one block, per unit:
its start and what the unit holds, pickled: for a sharded source the shard slices it covers (each actor
lists those shards itself and keeps the last two), else its items (keys and picklable loaders). A pool of
actors maps it, one unit per call (the explicit batch size); each actor builds ONE encoder from the registry
spec ``encoder.id`` and decodes (with ``cpus_per_actor`` threads) and encodes its units. Ray Data's
``preserve_order`` option returns the units in plan order as they complete, so
:func:`cpp.embed.embed_source` writes each chunk as soon as it is full (and parts of it as it fills) and a
run resumes after its last saved part, whichever engine wrote the store before. Measured on a 2-CPU machine
with units of uneven cost, ``preserve_order`` took as long as unordered output put back in order by the
driver, which needed a reorder buffer of up to 5 units.

Ray is imported only when the engine runs, so ``import cpp`` works without it (``pip install 'cpp[ray]'``).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import socket
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any

import numpy as np
import torch

from cpp.encoders.base import Encoder
from cpp.engines.base import DecodedUnit, EmbedEngine, EncodedUnit, decode_unit, encode_unit
from cpp.engines.registry import register_engine
from cpp.errors import CppError
from cpp.logging import get_logger
from cpp.sources import Item, PartLists, SourceItems

_log = get_logger(__name__)

INSTALL_HINT = "pip install 'cpp[ray]'"
#: How a remote traceback names one of our exceptions: ``cpp.encoders.base.EncoderUnavailable: ...``.
_CPP_EXCEPTION_LINE = re.compile(r"cpp(\.\w+)+: ")
#: GPU actors get the cluster's CPUs per GPU for decoding, up to this many.
MAX_DECODE_CPUS_PER_GPU_ACTOR = 8


class RayEngineError(CppError):
    """Ray is not installed or not reachable, or the embedding actors failed."""


def import_ray() -> ModuleType:
    """The ``ray`` module with Ray Data loaded; :class:`RayEngineError` with the install hint without it."""
    try:
        import ray
        import ray.data  # the engine needs Ray Data, not just Ray core
    except ImportError as exc:
        raise RayEngineError(f"the ray engine needs Ray Data ({exc}): {INSTALL_HINT}") from None
    return ray


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Raise :class:`OSError` at once when a ``[ray://]host:port`` address takes no connections (``ray.init``
    would retry for minutes); other forms (``auto``) are left to Ray."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if host and port.isdigit():
        socket.create_connection((host, int(port)), timeout=timeout_s).close()


class UnitEmbedder:
    """A Ray Data actor: one encoder built from its registry spec, one unit embedded per call."""

    def __init__(self, spec: str, device: str, threads: int, max_pixels: int) -> None:
        from cpp.encoders import create_encoder

        if device == "cpu":
            torch.set_num_threads(threads)
        self.encoder = create_encoder(spec, device=device)
        self.max_pixels = max_pixels
        self.threads = threads
        self.pool = ThreadPoolExecutor(threads) if threads > 1 else None
        self.parts = PartLists(keep=2)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        (start,) = batch["start"]
        (payload,) = batch["items"]
        unit = encode_unit(self._decode(self.parts.resolve(pickle.loads(payload))), self.encoder)
        return {
            "start": np.array([start], dtype=np.int64),
            "features": np.array([unit.features.astype(np.float32).tobytes()], dtype=object),
            "failures": np.array([json.dumps(sorted(unit.failures.items()))], dtype=object),
            "encode_s": np.array([unit.encode_s], dtype=np.float64),
        }

    def _decode(self, items: list[Item]) -> DecodedUnit:
        """Decode the unit's items, split over the actor's threads (PIL releases the GIL while decoding)."""
        size = len(items)
        if self.pool is None or size < 2:
            return decode_unit(
                items, 0, self.encoder.preprocess, self.max_pixels, self.encoder.geometry, True
            )
        bounds = np.linspace(0, size, min(self.threads, size) + 1).astype(int).tolist()
        parts = list(
            self.pool.map(
                lambda a, b: decode_unit(  # the local engine's decode: windowed resize, JPEG draft
                    items[a:b], a, self.encoder.preprocess, self.max_pixels, self.encoder.geometry, True
                ),
                bounds[:-1],
                bounds[1:],
            )
        )
        batches = [part.batch for part in parts if part.batch is not None]
        failures = {part.start + p: reason for part in parts for p, reason in part.failures.items()}
        return DecodedUnit(0, size, torch.cat(batches) if batches else None, failures)


class RayEngine(EmbedEngine):
    """Embed units with a pool of Ray Data actors (one encoder each) on a local or remote Ray cluster.

    ``address``: ``None`` connects to ``RAY_ADDRESS`` when set, else starts Ray on this machine; or a
    cluster address (``auto``, ``ray://host:10001``, ``host:6379``). ``actors``: default as many as the
    cluster's GPUs (GPU actors) or CPUs allow. ``gpus_per_actor``: default 1 when the encoder's device is
    CUDA, else 0. ``cpus_per_actor``: decode threads (and torch threads on the CPU) per actor; default 1,
    or the cluster's CPUs per GPU (up to 8) for GPU actors. A Ray connection made by the engine is closed
    when its run ends; one the caller made (``ray.init`` before) is left open.
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        actors: int | None = None,
        gpus_per_actor: float | None = None,
        cpus_per_actor: float | None = None,
    ) -> None:
        if actors is not None and actors < 1:
            raise RayEngineError(f"the number of Ray actors must be at least 1, got {actors}")
        if gpus_per_actor is not None and gpus_per_actor < 0:
            raise RayEngineError(f"GPUs per actor must be >= 0, got {gpus_per_actor}")
        if cpus_per_actor is not None and cpus_per_actor <= 0:
            raise RayEngineError(f"CPUs per actor must be positive, got {cpus_per_actor}")
        self.address = address
        self.actors = actors
        self.gpus_per_actor = gpus_per_actor
        self.cpus_per_actor = cpus_per_actor
        self._resolved: dict[str, Any] = {}

    def run(
        self, items: Sequence[Item], units: list[tuple[int, int]], encoder: Encoder, max_pixels: int
    ) -> Generator[EncodedUnit, None, None]:
        if not units:
            return
        ray = import_ray()
        connected_here = self._connect(ray)
        sizes = {start: end - start for start, end in units}
        batches: Iterator[dict[str, np.ndarray]] | None = None
        try:
            dataset = self._dataset(ray, items, units, encoder, max_pixels)
            batches = iter(dataset.iter_batches(batch_size=None, batch_format="numpy"))
            for batch in batches:
                for start, features, failures, encode_s in zip(
                    batch["start"], batch["features"], batch["failures"], batch["encode_s"], strict=True
                ):
                    yield EncodedUnit(
                        start=int(start),
                        size=sizes[int(start)],
                        features=np.frombuffer(features, dtype=np.float32).reshape(-1, encoder.dim),
                        failures={int(p): str(reason) for p, reason in json.loads(failures)},
                        encode_s=float(encode_s),
                    )
        except ray.exceptions.RayError as exc:
            raise RayEngineError(f"the Ray embedding actors failed: {_failure(exc)}") from exc
        finally:
            close = getattr(batches, "close", None)
            if close is not None:  # stops Ray's execution now when the caller stops early (cancelled)
                close()
            if connected_here:
                ray.shutdown()

    def _connect(self, ray: ModuleType) -> bool:
        """Connect to (or start) Ray unless this process already is; whether this call connected."""
        if ray.is_initialized():
            if self.address is not None:
                _log.warning("Ray is already initialised here; ignoring the address %r", self.address)
            return False
        where = self.address or os.environ.get("RAY_ADDRESS")
        try:
            if where is None:
                ray.init(include_dashboard=False)
            else:
                check_reachable(where)
                ray.init(address=self.address)
        except (OSError, RuntimeError, ValueError) as exc:  # ConnectionError is an OSError
            raise RayEngineError(
                f"cannot connect to the Ray cluster at {where!r}: {exc}. Start one with `ray start --head` "
                "(see the README, 'Running on a Ray cluster') or leave out the address to run Ray here."
            ) from exc
        return True

    def _resolve(self, ray: ModuleType, encoder: Encoder, units: int) -> dict[str, Any]:
        """Actor count, resources and device from the options, the encoder's device and the cluster."""
        resources = ray.cluster_resources()
        cluster_gpus = float(resources.get("GPU", 0.0))
        cluster_cpus = float(resources.get("CPU", 1.0))
        gpus = self.gpus_per_actor
        if gpus is None:
            gpus = 1.0 if encoder.device.type == "cuda" else 0.0
        cpus = self.cpus_per_actor
        if cpus is None:
            per_gpu = int(cluster_cpus // max(cluster_gpus, 1.0))
            cpus = 1.0 if gpus == 0 else float(max(1, min(MAX_DECODE_CPUS_PER_GPU_ACTOR, per_gpu)))
        actors = self.actors
        if actors is None:
            if gpus > cluster_gpus:
                raise RayEngineError(
                    f"actors need {gpus:g} GPU each but the Ray cluster has {cluster_gpus:g}; add GPU nodes, "
                    "embed on CPUs (--device cpu or --ray-gpus-per-actor 0), or give --ray-actors to wait "
                    "for an autoscaling cluster"
                )
            actors = int(cluster_gpus // gpus) if gpus > 0 else int(cluster_cpus // cpus)
        actors = max(1, min(actors, units))
        if actors * cpus > cluster_cpus or actors * gpus > cluster_gpus:
            _log.warning(
                "%d actors x (%g CPU, %g GPU) exceed the Ray cluster's %g CPUs and %g GPUs: "
                "some actors wait until the cluster grows",
                actors,
                cpus,
                gpus,
                cluster_cpus,
                cluster_gpus,
            )
        nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
        _log.info(
            "ray engine: %d actors (%g CPU, %g GPU each) on %d node(s), %d units",
            actors,
            cpus,
            gpus,
            nodes,
            units,
        )
        return {
            "actors": actors,
            "cpus_per_actor": cpus,
            "gpus_per_actor": gpus,
            "actor_device": "cuda" if gpus > 0 else "cpu",
            "nodes": nodes,
            "ray_version": ray.__version__,
        }

    def _dataset(
        self,
        ray: ModuleType,
        items: Sequence[Item],
        units: list[tuple[int, int]],
        encoder: Encoder,
        max_pixels: int,
    ) -> Any:
        """The lazy Ray dataset of encoded units, in plan order."""
        settings = self._resolved = self._resolve(ray, encoder, len(units))
        context = ray.data.DataContext.get_current()
        saved = (context.execution_options.preserve_order, context.enable_progress_bars)
        context.execution_options.preserve_order = True  # units come back in plan order
        context.enable_progress_bars = False  # embed_source shows its own
        try:  # a dataset keeps the context current at its creation
            rows = [{"start": start, "items": unit_payload(items, start, end)} for start, end in units]
            dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
            return dataset.map_batches(
                UnitEmbedder,
                batch_size=1,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=settings["actors"]),
                fn_constructor_kwargs={
                    "spec": encoder.id,
                    "device": settings["actor_device"],
                    "threads": max(1, int(settings["cpus_per_actor"])),
                    "max_pixels": max_pixels,
                },
                num_cpus=settings["cpus_per_actor"],
                num_gpus=settings["gpus_per_actor"],
            )
        finally:
            context.execution_options.preserve_order, context.enable_progress_bars = saved

    def describe(self) -> dict[str, object]:
        settings = {
            "actors": self.actors,
            "cpus_per_actor": self.cpus_per_actor,
            "gpus_per_actor": self.gpus_per_actor,
        }
        return {
            "engine": self.name,
            "address": self.address or os.environ.get("RAY_ADDRESS") or "local",
            **settings,
            **self._resolved,
        }


def unit_payload(items: Sequence[Item], start: int, end: int) -> bytes:
    """A unit's row payload: shard slices of a sharded source (a few hundred bytes), else its items."""
    entries = items.unit_entries(start, end) if isinstance(items, SourceItems) else list(items[start:end])
    return pickle.dumps(entries, protocol=5)


def _failure(exc: Exception) -> str:
    """What went wrong in an actor: the remote CppError line when there is one, else Ray's whole report."""
    report = str(exc)
    ours = [line for line in report.splitlines() if _CPP_EXCEPTION_LINE.match(line)]
    return ours[-1] if ours else report


@register_engine("ray")
def ray_engine(
    *,
    address: str | None = None,
    actors: int | None = None,
    gpus_per_actor: float | None = None,
    cpus_per_actor: float | None = None,
) -> RayEngine:
    """Embed with Ray Data actors (one encoder each) on this machine or a Ray cluster (``cpp[ray]``)."""
    import_ray()
    return RayEngine(address, actors, gpus_per_actor, cpus_per_actor)
