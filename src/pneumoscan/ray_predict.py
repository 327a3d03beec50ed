"""``pneumoscan predict --engine ray``: whole archives on Ray Data, on one machine or a cluster.

Ray Data reads the files (``read_binary_files``: local paths, or any filesystem URI pyarrow
understands, such as ``s3://bucket/films/``), ``map_batches`` runs the same :class:`Predictor`
as the local engine in actors (each loads the bundle, and its ONNX session, once), and the rows
have exactly the local engine's columns and values (:func:`pneumoscan.inference.prediction_row`).

Ray is the extra ``pneumoscan[ray]``; without it the engine says so in one line.
"""

from __future__ import annotations

import logging
import math
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pneumoscan.errors import ConfigError, PneumoscanError
from pneumoscan.imaging import MAX_FILE_BYTES, read_file
from pneumoscan.inference import PREDICTION_COLUMNS, error_result, prediction_row

log = logging.getLogger(__name__)

RAY_MISSING = "--engine ray needs Ray Data: pip install 'pneumoscan[ray]'"
#: What a folder or URI contributes, as the local engine reads folders.
IMAGE_EXTENSIONS = ["jpeg", "jpg", "png", "dcm"]


def require_ray() -> None:
    """Raises ConfigError (one line) when Ray Data is not installed."""
    try:
        import ray.data  # noqa: F401
    except ImportError:
        raise ConfigError(RAY_MISSING) from None


@dataclass(frozen=True)
class Inputs:
    """What goes to Ray (``sources``: files and URIs), what the driver answers itself (files it
    cannot read, as the local engine would report them), and the user's spelling of each file."""

    sources: list[str]
    names: dict[str, str]  # path as Ray reports it -> the path as given (the CSV's "path")
    order: dict[str, list[int]]  # the path as given -> its places among the inputs (a path may be named twice)
    refused: list[tuple[str, ...]]  # rows for files that are not regular files or are too large


def plan_inputs(paths: Sequence[str]) -> Inputs:
    """Local files and folders expanded as the local engine expands them; URIs passed on."""
    from pneumoscan.data import collect_image_paths

    sources, names, order, refused = [], {}, {}, []
    local = [p for p in paths if "://" not in str(p)]
    for index, path in enumerate(collect_image_paths(local)):
        shown = str(path)
        order.setdefault(shown, []).append(index)
        try:
            info = os.stat(path)
            readable = stat.S_ISREG(info.st_mode) and info.st_size <= MAX_FILE_BYTES
        except OSError:
            readable = False
        if not readable:  # Ray would fail the whole job, or read it whole: the local engine's error
            try:
                read_file(Path(path))
            except PneumoscanError as exc:
                refused.append(prediction_row(error_result(shown, exc)))
                continue
        absolute = str(Path(path).resolve())
        sources.append(absolute)
        names[absolute] = shown
    sources += [str(p) for p in paths if "://" in str(p)]
    return Inputs(sources, names, order, refused)


class PredictActor:
    """One Ray actor: the bundle loaded once, then a batch of files -> prediction rows."""

    def __init__(self, model: str | None, backend: str, tta: bool, operating_point: str | None,
                 threshold: float | None, gate: bool, names: dict[str, str]) -> None:
        from pneumoscan.inference import Predictor

        self.predictor = Predictor.from_bundle(Path(model) if model else None, backend=backend, tta=tta)
        self.options = {"operating_point": operating_point, "threshold": threshold, "gate": gate}
        self.names = names

    def __call__(self, batch: dict) -> dict:
        results, images, where = [], [], []
        for path, data in zip(batch["path"], batch["bytes"]):
            name = self.names.get(str(path), str(path))
            try:
                images.append(self.predictor.preprocessing.decode(bytes(data), name=name))
                where.append((len(results), name))
                results.append(None)
            except PneumoscanError as exc:
                results.append(error_result(name, exc))
        if images:
            predicted = self.predictor.predict(images, names=[name for _, name in where], **self.options)
            for (slot, _), result in zip(where, predicted):
                results[slot] = result
        rows = [prediction_row(result) for result in results]
        return {column: [row[i] for row in rows] for i, column in enumerate(PREDICTION_COLUMNS)}


def predict_on_ray(paths: Sequence[str], *, model: Path | None = None, backend: str = "auto", tta: bool = False,
                   operating_point: str | None = None, threshold: float | None = None, gate: bool = True,
                   address: str | None = None, actors: int | None = None, batch_size: int = 32,
                   progress: Callable[[int], None] | None = None) -> list[tuple[str, ...]]:
    """Prediction rows (:data:`PREDICTION_COLUMNS`), one for every input, in the local engine's
    order (local inputs as given, then URIs by path); ``progress(n)`` as batches finish.

    Joins the cluster at ``address`` (``auto``: the one ``ray start`` began here), else starts a
    local Ray on this machine; ``actors`` (default: one per CPU of the cluster) each hold one
    bundle with one inference thread.

    Raises:
        ConfigError: Ray is missing, or the cluster cannot be reached.
    """
    require_ray()
    import ray

    inputs = plan_inputs(paths)
    found = list(inputs.refused)
    if progress is not None and inputs.refused:
        progress(len(inputs.refused))
    if not inputs.sources:
        return found
    # Ray's own INFO and WARNING lines (plans, progress, token set-up) would bury the one summary.
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                     runtime_env={"env_vars": {"PNEUMOSCAN_INFERENCE_THREADS": "1"}})
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"cannot join the Ray cluster at {address}: {exc}") from None
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    pool = actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
    # Reading is I/O: it reserves no CPU, so that actors holding every CPU cannot starve it. Nothing
    # then bounds how many read tasks run at once, and each wants a worker process of its own: on
    # 2 CPUs the 624 test films took 4.4 s through Ray Data unbounded, 2.6 s at one task per CPU
    # (with 32 blocks Ray started 28 worker processes and warned).
    remote = any("://" in source for source in inputs.sources)
    # A block per batch where the files are counted (local ones): an actor hands on its output a
    # block at a time, and Ray's own choice for the 624 test films, 5 blocks of 125, moved the
    # progress bar in five steps, the first at 15 s of 19 s; a block per batch streams it.
    blocks = None if remote else max(1, math.ceil(len(inputs.sources) / batch_size))
    files = ray.data.read_binary_files(inputs.sources, include_paths=True, num_cpus=0, concurrency=pool,
                                       override_num_blocks=blocks, file_extensions=IMAGE_EXTENSIONS if remote else None)
    # Ray Data restarts an actor that dies (a node lost, a process killed) and retries its batch.
    rows = files.map_batches(
        PredictActor, fn_constructor_kwargs={
            "model": str(model) if model else None, "backend": backend, "tta": tta, "operating_point": operating_point,
            "threshold": threshold, "gate": gate, "names": inputs.names},
        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=pool), num_cpus=1)
    for batch in rows.iter_batches(batch_size=None, batch_format="pandas"):
        chunk = [tuple("" if value is None else str(value) for value in row)
                 for row in batch[list(PREDICTION_COLUMNS)].itertuples(index=False, name=None)]
        found += chunk
        if progress is not None:
            progress(len(chunk))
    places = {path: iter(indices) for path, indices in inputs.order.items()}
    last = sum(len(indices) for indices in inputs.order.values())
    keyed = [(next(places[row[0]], last) if row[0] in places else last, row[0], row) for row in found]
    return [row for *_, row in sorted(keyed, key=lambda item: item[:2])]


def write_parquet(path: Path, rows: Sequence[tuple[str, ...]]) -> None:
    """The rows as one Parquet file, every column a string, as in the CSV."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({column: [row[i] for row in rows] for i, column in enumerate(PREDICTION_COLUMNS)},
                     schema=pa.schema([(column, pa.string()) for column in PREDICTION_COLUMNS]))
    pq.write_table(table, str(path))
