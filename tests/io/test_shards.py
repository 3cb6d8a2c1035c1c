"""Shard contents are verified on read (issue 10, item 3 and 7): a changed byte, random bytes, a truncated
file, a shard copied from another experiment, or a non-finite signal value stop with one sentence that
names the file, never a traceback or a silent use."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from prefkd.errors import PrefkdError
from prefkd.io.shards import (
    EXPERIMENT_ENV,
    make_provenance,
    read_shard,
    reverse_shard,
    shard_provenance,
    shard_stats,
    write_shard,
)


def _copy(src: Path, tmp_path: Path, name: str = "shard-1-of-1.arrow") -> Path:
    dst = tmp_path / "train" / name
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)
    return dst


def _overwrite_keeping_size_and_mtime(path: Path, offset: int, data: bytes) -> None:
    st = path.stat()
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size


def _find(path: Path, values: list[int]) -> int:
    """The file offset of a run of int32 token ids (the first response ids of the first row)."""
    needle = np.asarray(values, dtype="<i4").tobytes()
    offset = path.read_bytes().find(needle)
    assert offset > 0
    return offset


def test_a_written_shard_reads_back(shared_tokens, tmp_path):
    path = _copy(shared_tokens, tmp_path)
    assert read_shard(path, "tokens").num_rows > 0


def test_overwritten_token_ids_are_caught(shared_tokens, tmp_path):
    path = _copy(shared_tokens, tmp_path)
    ids = read_shard(path, "tokens").column("student_chosen_input_ids")[0].as_py()
    offset = _find(path, ids[2:8])
    _overwrite_keeping_size_and_mtime(path, offset, np.asarray([7, 7, 7, 7, 7, 7], dtype="<i4").tobytes())
    with pytest.raises(PrefkdError, match="does not match its checksum") as info:
        read_shard(path, "tokens")
    assert str(path) in str(info.value)
    with pytest.raises(PrefkdError, match="does not match its checksum"):
        shard_stats(path)  # what alignment-stats and weights-stats read


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_random_bytes_give_one_sentence(shared_tokens, tmp_path, where):
    path = _copy(shared_tokens, tmp_path)
    size = path.stat().st_size
    offset = {"start": 0, "middle": size // 2, "end": size - 64}[where]
    _overwrite_keeping_size_and_mtime(path, offset, np.random.default_rng(1).bytes(48))
    with pytest.raises(PrefkdError) as info:
        read_shard(path, "tokens")
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_truncated_shard_gives_one_sentence_in_every_reader(shared_tokens, tmp_path):
    path = _copy(shared_tokens, tmp_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    for read in (
        lambda: read_shard(path, "tokens"),
        lambda: shard_stats(path),
        lambda: reverse_shard(path, tmp_path / "r.arrow"),
    ):
        with pytest.raises(PrefkdError, match="not a readable Arrow IPC file") as info:
            read()
        assert str(path) in str(info.value)


def test_a_shard_from_another_experiment_is_refused(shared_tokens, tmp_path, monkeypatch):
    table = read_shard(shared_tokens, "tokens")
    monkeypatch.setenv(EXPERIMENT_ENV, "alpha")
    path = tmp_path / "train" / "shard-1-of-1.arrow"
    write_shard(table, path, "tokens", provenance=make_provenance(path, {"x": 1}, {"source": shared_tokens}))
    assert shard_provenance(path)["experiment"] == "alpha"
    assert read_shard(path, "tokens").num_rows == table.num_rows
    monkeypatch.setenv(EXPERIMENT_ENV, "beta")
    with pytest.raises(PrefkdError, match="written for experiment 'alpha', not 'beta'"):
        read_shard(path, "tokens")


def test_provenance_names_split_shard_settings_and_inputs(shared_tokens, tmp_path, monkeypatch):
    monkeypatch.setenv(EXPERIMENT_ENV, "alpha")
    out = tmp_path / "valid" / "shard-2-of-3.arrow"
    prov = make_provenance(out, {"max_length": 96}, {"tokens": shared_tokens})
    assert prov["experiment"] == "alpha" and prov["split"] == "valid" and prov["shard"] == "shard-2-of-3"
    stored = pa.ipc.open_file(pa.memory_map(str(shared_tokens))).schema.metadata[b"prefkd.sha256"].decode()
    assert prov["inputs"] == {"tokens": stored} and len(prov["stage_fingerprint"]) == 16
    assert make_provenance(out, {"max_length": 97}, {})["stage_fingerprint"] != prov["stage_fingerprint"]


def test_reversed_shard_is_verified_and_records_its_source(shared_tokens, tmp_path):
    out = tmp_path / "rev.arrow"
    reverse_shard(shared_tokens, out)
    table = read_shard(out, "tokens")
    assert (
        table.column("student_chosen_input_ids").to_pylist()
        == read_shard(shared_tokens).column("student_rejected_input_ids").to_pylist()
    )
    assert shard_provenance(out)["reversed_from"]["path"] == str(shared_tokens)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_signal_values_are_named(tmp_path, bad):
    weights = pa.array([[1.0, 2.0], [1.5, bad]], type=pa.list_(pa.float32()))
    table = pa.table({"pair_id": pa.array([10, 11], pa.int64()), "chosen_weights": weights})
    path = tmp_path / "signals.arrow"
    write_shard(table, path, "signals")
    with pytest.raises(PrefkdError, match="column 'chosen_weights' holds a non-finite value in the row of pair 11"):
        read_shard(path, "signals")


def test_a_shard_without_checksum_is_refused(tmp_path):
    table = pa.table({"pair_id": pa.array([1], pa.int64())}).replace_schema_metadata({b"prefkd.kind": b"signals"})
    path = tmp_path / "old.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    with pytest.raises(PrefkdError, match="carries no checksum"):
        read_shard(path, "signals")
