"""``predict --engine ray`` on a local Ray cluster of 2 CPUs: the same rows as the local engine,
every input once, unreadable files as error rows, and a complete answer when an actor is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import image_bytes, make_xray

ray = pytest.importorskip("ray", reason="needs Ray Data (pip install 'pneumoscan[ray]')")

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray"


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PNEUMOSCAN_INFERENCE_THREADS": "1"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def films(tmp_path_factory) -> list[str]:
    """300 synthetic films, 40 real test films when ../shared/data is here, and unreadable files."""
    folder = tmp_path_factory.mktemp("archive")
    for i in range(300):
        (folder / f"synthetic-{i:03d}.png").write_bytes(image_bytes(make_xray(i, pneumonia=i % 2 == 1, size=(96, 80))))
    (folder / "not-an-image.png").write_bytes(b"these are not pixels")
    (folder / "empty.jpeg").write_bytes(b"")
    inputs = [str(folder), str(folder / "does-not-exist.png")]
    if DATA.is_dir():
        real = sorted((DATA / "test").rglob("*.jpeg"))[::15][:40]
        inputs += [str(p) for p in real]
    return inputs


def _local_rows(bundle: Path | None, inputs: list[str]) -> list[tuple[str, ...]]:
    from pneumoscan.data import collect_image_paths
    from pneumoscan.inference import Predictor, prediction_row

    predictor = Predictor.from_bundle(bundle)
    return [prediction_row(r) for r in predictor.predict_paths(collect_image_paths(inputs))]


def test_ray_gives_the_local_engines_rows_for_every_input_once(local_ray, films: list[str]) -> None:
    from pneumoscan.ray_predict import predict_on_ray

    done: list[int] = []
    rows = predict_on_ray(films, batch_size=16, progress=done.append)
    expected = _local_rows(None, films)
    assert rows == expected  # same columns, same values (probabilities to 1e-6), same order
    assert len({row[0] for row in rows}) == len(rows) == len(expected) and sum(done) == len(rows)
    # the progress streams, about a batch at a time (18 steps here; 5 when Ray chose the blocks)
    assert len(done) >= len(rows) // 16 // 2
    by_path = {row[0]: row for row in rows}
    errors = {Path(path).name: row for path, row in by_path.items() if row[1] == "error"}
    assert set(errors) == {"not-an-image.png", "empty.jpeg", "does-not-exist.png"}
    assert all(row[8] for row in errors.values())  # each says why
    assert sum(row[1] == "ok" for row in rows) + sum(row[1] == "rejected" for row in rows) == len(rows) - 3


def _actor_pids() -> list[int]:
    """Ray Data's predicting actors: processes titled ray::MapWorker(MapBatches(PredictActor))."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if title.startswith(b"ray::MapWorker") and b"PredictActor" in title:
                pids.append(int(entry.name))
    return pids


def test_an_actor_killed_mid_run_is_replaced_and_the_output_is_complete(local_ray, films: list[str]) -> None:
    from pneumoscan.ray_predict import predict_on_ray

    killed: list[int] = []

    def kill_one_actor(n: int) -> None:  # at the first finished batch: most of the archive is still to do
        if not killed and (pids := _actor_pids()):
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    rows = predict_on_ray(films, batch_size=8, progress=kill_one_actor)
    assert killed, "no predicting actor was found to kill"
    assert rows == _local_rows(None, films)


def test_the_cli_writes_the_same_csv_and_parquet_with_either_engine(local_ray, films: list[str], tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    def run(*extra: str) -> subprocess.CompletedProcess:
        # the archive folder named twice: each of its files gets two rows, in the local engine's order
        return subprocess.run([sys.executable, "-m", "pneumoscan", "predict", *films[:2], films[0], "--quiet", *extra],
                              capture_output=True, text=True, timeout=600)

    local = run("--csv", str(tmp_path / "local.csv"))
    on_ray = run("--engine", "ray", "--ray-actors", "2", "--csv", str(tmp_path / "ray.csv"),
                 "--parquet", str(tmp_path / "ray.parquet"))
    assert local.returncode == on_ray.returncode == 1  # unreadable files
    assert (tmp_path / "ray.csv").read_text() == (tmp_path / "local.csv").read_text()
    table = pq.read_table(tmp_path / "ray.parquet").to_pylist()
    import csv

    with (tmp_path / "local.csv").open(newline="") as handle:
        assert table == list(csv.DictReader(handle))
    assert "Traceback" not in on_ray.stderr
    assert on_ray.stderr.count("error: ") == local.stderr.count("error: ") == 5


def test_ray_options_without_the_ray_engine_say_so() -> None:
    done = subprocess.run([sys.executable, "-m", "pneumoscan", "predict", "x.png", "--ray-address", "auto"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "go with --engine ray" in done.stderr


def test_a_filesystem_uri_is_read_by_ray_with_the_same_answers(local_ray, films: list[str]) -> None:
    """A URI (here file://, as s3:// or gs:// would be) goes to pyarrow's filesystem: every image
    under it gets a row, with the probabilities the local engine gives the same files."""
    from pneumoscan.ray_predict import predict_on_ray

    folder = Path(films[0])
    rows = predict_on_ray([f"file://{folder}"], batch_size=32)
    local = {Path(row[0]).name: row[1:] for row in _local_rows(None, [str(folder)])}
    assert len(rows) == len(local) == 302  # 300 films and the two unreadable ones (.png, .jpeg)
    assert {Path(row[0]).name: row[1:] for row in rows} == local
