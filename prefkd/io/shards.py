"""The Arrow shard contracts between stages, written down once.

A token shard holds one row per preference pair (see ``TOKEN_SCHEMA``); a
signal shard (later stages) adds per-span teacher values keyed by ``pair_id``.
Shards are Arrow IPC files, written atomically (temp name, then rename), with
deterministic bytes for deterministic inputs. Readers validate the schema so a
stale or foreign file fails with one sentence instead of deep inside a stage.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from prefkd.core.layout import ROLES, SIDES
from prefkd.core.settings import setting
from prefkd.errors import PrefkdError

STATS_KEY = b"prefkd.stats"
KIND_KEY = b"prefkd.kind"
CHECKSUM_KEY = b"prefkd.sha256"  # of the table's contents (its Arrow IPC stream without metadata)
PROVENANCE_KEY = b"prefkd.provenance"
EXPERIMENT_ENV = "PREFKD_EXPERIMENT"
ARROW_MAGIC = b"ARROW1"  # the workflow exports its experiment name to every job

_ids = pa.list_(pa.int32())


def _token_fields() -> list[pa.Field]:
    fields = [pa.field("pair_id", pa.int64(), nullable=False)]
    for role in ROLES:
        fields.append(pa.field(f"{role}_prompt_len", pa.int32(), nullable=False))
        for side in SIDES:
            fields.append(pa.field(f"{role}_{side}_input_ids", _ids, nullable=False))
            fields.append(pa.field(f"{role}_{side}_span_ids", _ids, nullable=False))
    for side in SIDES:
        fields.append(pa.field(f"{side}_num_spans", pa.int32(), nullable=False))
        fields.append(pa.field(f"{side}_span_bytes", _ids, nullable=False))
        fields.append(pa.field(f"{side}_truncated", pa.bool_(), nullable=False))
    return fields


TOKEN_SCHEMA = pa.schema(_token_fields())
"""Required columns of a token shard.

``{role}_{side}_input_ids``: prompt (chat template, generation prompt) + response + EOS
(EOS only when the response was not truncated), unpadded. ``{role}_{side}_span_ids``:
span index of every token, -1 outside the response spans (prompt, EOS).
``{side}_span_bytes``: end offset of every span in the response's UTF-8 bytes.
``{role}_prompt_len``: number of prompt tokens (the response starts there).
"""

TOKEN_OPTIONAL = {
    "chosen_planted": pa.list_(pa.list_(pa.int32())),
    "rejected_planted": pa.list_(pa.list_(pa.int32())),
    "family": pa.string(),
}
"""Columns carried through when the source data has them (the demo's planted differences)."""


def content_checksum(table: pa.Table) -> str:
    """sha256 of a table's contents: its Arrow IPC stream with the schema metadata left out."""
    sink = pa.BufferOutputStream()
    plain = table.replace_schema_metadata(None)
    with pa.ipc.new_stream(sink, plain.schema) as writer:
        writer.write_table(plain)
    return hashlib.sha256(sink.getvalue()).hexdigest()


def file_checksum(path: str | Path) -> str:
    """A shard's stored content checksum, or the sha256 of any other file (streamed)."""
    path = Path(path)
    if path.suffix == ".arrow":
        return _open(path).schema.metadata.get(CHECKSUM_KEY, b"").decode() or "unchecked"
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def make_provenance(out: str | Path, settings: dict, inputs: dict[str, str | Path]) -> dict:
    """Where a shard comes from: the experiment (from the workflow's environment), its split and shard (from
    its path ``<split>/shard-<k>-of-<n>.arrow``), a fingerprint of the writing stage's settings, and the
    checksums of its inputs (``{name: path}``)."""
    out = Path(out)
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {
        "experiment": os.environ.get(EXPERIMENT_ENV) or None,
        "split": out.parent.name,
        "shard": out.stem,
        "stage_fingerprint": fingerprint,
        "inputs": {name: file_checksum(path) for name, path in sorted(inputs.items())},
    }


def write_shard(
    table: pa.Table, path: str | Path, kind: str, stats: dict | None = None, provenance: dict | None = None
) -> None:
    """Write ``table`` as an Arrow IPC file atomically, with its kind, content checksum, optional stats and
    provenance in its metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(table.schema.metadata or {})
    meta[KIND_KEY] = kind.encode()
    meta[CHECKSUM_KEY] = content_checksum(table).encode()
    if stats is not None:
        meta[STATS_KEY] = json.dumps(stats, sort_keys=True).encode()
    if provenance is not None:
        meta[PROVENANCE_KEY] = json.dumps(provenance, sort_keys=True).encode()
    table = table.replace_schema_metadata(meta)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with pa.OSFile(str(tmp), "wb") as sink:
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    os.replace(tmp, path)


def _open(path: Path) -> pa.ipc.RecordBatchFileReader:
    """The IPC reader of a shard file, or one sentence naming the file."""
    if not path.exists():
        raise PrefkdError(f"shard {path} does not exist; run the stage that writes it first.")
    try:
        with open(path, "rb") as fh:
            if fh.read(6) != ARROW_MAGIC:  # the reader itself only looks at the footer
                raise pa.ArrowInvalid("the file does not start with the Arrow magic bytes")
        return pa.ipc.open_file(pa.memory_map(str(path), "r"))
    except (pa.ArrowInvalid, OSError) as exc:
        raise PrefkdError(
            f"shard {path} is not a readable Arrow IPC file ({exc}); delete it and rerun its stage."
        ) from exc


def read_shard(path: str | Path, kind: str = "tokens") -> pa.Table:
    """Read and verify a shard written by ``write_shard``: readable, of the expected kind and schema, its
    contents equal to its checksum, from this workflow's experiment, and (signal shards) finite."""
    path = Path(path)
    try:
        table = _open(path).read_all()
        table.validate(full=True)
    except (pa.ArrowInvalid, OSError) as exc:
        raise PrefkdError(
            f"shard {path} is not a readable Arrow IPC file ({exc}); delete it and rerun its stage."
        ) from exc
    meta = table.schema.metadata or {}
    found = meta.get(KIND_KEY, b"").decode()
    if found != kind:
        raise PrefkdError(f"shard {path} holds {found or 'unknown'!r} data, expected {kind!r}.")
    _check_schema(table, path, kind)
    _check_checksum(table, path)
    _check_experiment(meta, path)
    if kind == "signals":
        _check_finite(table, path)
    return table


def _check_schema(table: pa.Table, path: Path, kind: str) -> None:
    expected = TOKEN_SCHEMA if kind == "tokens" else None
    if expected is None:
        return
    for field in expected:
        if field.name not in table.column_names:
            raise PrefkdError(
                f"shard {path} lacks column {field.name!r}; it was written by another prefkd version, rerun its stage."
            )
        if table.schema.field(field.name).type != field.type:
            raise PrefkdError(
                f"shard {path} column {field.name!r} has type {table.schema.field(field.name).type}, expected {field.type}."
            )


def _check_checksum(table: pa.Table, path: Path) -> None:
    stored = (table.schema.metadata or {}).get(CHECKSUM_KEY, b"").decode()
    if not stored:
        raise PrefkdError(
            f"shard {path} carries no checksum (written by an older prefkd); delete it and rerun its stage."
        )
    if content_checksum(table) != stored:
        raise PrefkdError(
            f"shard {path} does not match its checksum: its contents changed after it was written; delete it and rerun its stage."
        )


def _check_experiment(meta: dict, path: Path) -> None:
    expected = os.environ.get(EXPERIMENT_ENV)
    raw = meta.get(PROVENANCE_KEY)
    found = json.loads(raw).get("experiment") if raw else None
    if expected and found and found != expected:
        raise PrefkdError(
            f"shard {path} was written for experiment {found!r}, not {expected!r}: it was copied from another "
            f"experiment's results; delete it and rerun its stage."
        )


def _check_finite(table: pa.Table, path: Path) -> None:
    """Every float of a signal shard is finite; else one sentence naming the column and the pair."""
    for name in table.column_names:
        column = table.column(name)
        is_list = pa.types.is_list(column.type)
        if not pa.types.is_floating(column.type.value_type if is_list else column.type):
            continue
        values = pc.list_flatten(column) if is_list else column
        if pc.all(pc.is_finite(values)).as_py() in (True, None):
            continue
        for row, value in enumerate(column.to_pylist()):
            if any(v is not None and not math.isfinite(v) for v in (value if is_list else [value])):
                pair = table.column("pair_id")[row].as_py() if "pair_id" in table.column_names else row
                raise PrefkdError(f"shard {path} column {name!r} holds a non-finite value in the row of pair {pair}.")


def shard_stats(path: str | Path) -> dict:
    """The stats dict stored in a shard's metadata (empty if none), after verifying the whole shard as
    ``read_shard`` does: statistics of a changed shard must not be reported as its own."""
    path = Path(path)
    meta = _open(path).schema.metadata or {}
    read_shard(path, meta.get(KIND_KEY, b"").decode() or "tokens")
    raw = meta.get(STATS_KEY)
    return json.loads(raw) if raw else {}


def shard_provenance(path: str | Path) -> dict:
    """The provenance dict stored in a shard's metadata (empty if none)."""
    raw = (_open(Path(path)).schema.metadata or {}).get(PROVENANCE_KEY)
    return json.loads(raw) if raw else {}


def swap_sides(table: pa.Table) -> pa.Table:
    """The reversed dataset: chosen and rejected exchanged in every column that names a side."""
    names = table.column_names
    rename = {}
    for name in names:
        if "chosen" in name:
            rename[name] = name.replace("chosen", "rejected")
        elif "rejected" in name:
            rename[name] = name.replace("rejected", "chosen")
    columns = [table.column(n) for n in names]
    new_names = [rename.get(n, n) for n in names]
    swapped = pa.table(dict(zip(new_names, columns)))
    # keep the original column order
    return swapped.select(names).replace_schema_metadata(table.schema.metadata)


def reverse_shard(src: str | Path, dst: str | Path) -> int:
    """Write the reversed dataset of a token or signal shard (chosen <-> rejected); returns rows."""
    src = Path(src)
    kind = (_open(src).schema.metadata or {}).get(KIND_KEY, b"tokens").decode()
    table = read_shard(src, kind)
    swapped = swap_sides(table)
    meta = dict(swapped.schema.metadata or {})
    meta[b"prefkd.reversed"] = b"true" if meta.get(b"prefkd.reversed") != b"true" else b"false"
    stats = json.loads(meta.pop(STATS_KEY)) if STATS_KEY in meta else None
    provenance = json.loads(meta.pop(PROVENANCE_KEY)) if PROVENANCE_KEY in meta else {}
    provenance = {**provenance, "reversed_from": {"path": str(src), "sha256": meta.pop(CHECKSUM_KEY, b"").decode()}}
    write_shard(swapped.replace_schema_metadata(meta), dst, kind=kind, stats=stats, provenance=provenance)
    return swapped.num_rows


@dataclass(kw_only=True)
class ReverseSettings:
    """Settings of ``prefkd reverse`` (one job reverses every shard of a split: ``--in`` and ``--out`` pair up)."""

    src: list[Path] = setting(doc="token or signal shards", flag="--in")
    out: list[Path] = setting(doc="reversed shards to write, one per --in shard")


def paired_shards(inputs: list, outputs: list, what: str = "--in") -> list[tuple[Path, Path]]:
    """``(input, output)`` pairs of a job that walks several shards; one sentence when the counts differ."""
    if len(inputs) != len(outputs):
        raise PrefkdError(f"{len(inputs)} {what} shard(s) but {len(outputs)} --out shard(s): give one --out per shard.")
    return [(Path(a), Path(b)) for a, b in zip(inputs, outputs)]


def run_reverse(args: ReverseSettings) -> int:
    for src, out in paired_shards(args.src, args.out):
        rows = reverse_shard(src, out)
        print(f"wrote {out}: {rows} pairs with chosen and rejected exchanged")
    return 0


# ---------------------------------------------------------------------------------------------------------
# Resuming a job that writes several shards
# ---------------------------------------------------------------------------------------------------------


def path_identity(path: str | Path) -> str:
    """A cheap identity of a file or directory as it is now (names, sizes and modification times of its files):
    what a resumed job compares, where hashing a 30 GB model would cost minutes."""
    path = Path(path)
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for f in files:
        st = f.stat()
        digest.update(f"{f.relative_to(path) if path.is_dir() else f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class ShardStash:
    """Finished shards of a multi-shard job, kept where a failed job's clean-up does not reach.

    Snakemake deletes every output of a failed job, finished shards included. Each shard this job writes is
    also hard-linked into ``<its folder>/.stash/`` with the job's key (its settings and the identities of its
    inputs); a rerun with the same key links it back instead of recomputing it, and a finished job empties
    its part of the stash. A different key (changed settings or inputs) recomputes everything."""

    def __init__(self, key: str):
        self.key = key

    @staticmethod
    def _stashed(out: Path) -> tuple[Path, Path]:
        folder = out.parent / ".stash"
        return folder / out.name, folder / f"{out.name}.key"

    def restore(self, out: Path) -> bool:
        """Put back a finished shard of an earlier try of this job (same key); True when it was there."""
        shard, key = self._stashed(out)
        if not (shard.is_file() and key.is_file() and key.read_text() == self.key):
            return False
        try:
            read_shard(shard, _open(shard).schema.metadata.get(KIND_KEY, b"").decode())  # whole and unchanged
        except PrefkdError:
            return False
        out.parent.mkdir(parents=True, exist_ok=True)
        out.unlink(missing_ok=True)
        os.link(shard, out)
        return True

    def keep(self, out: Path) -> None:
        """Stash a shard this job has just written."""
        shard, key = self._stashed(out)
        shard.parent.mkdir(exist_ok=True)
        shard.unlink(missing_ok=True)
        os.link(out, shard)
        key.write_text(self.key)

    def clear(self, outs: list[Path]) -> None:
        """The job finished: its outputs are Snakemake's now."""
        for out in outs:
            for f in self._stashed(out):
                f.unlink(missing_ok=True)
        for folder in {out.parent / ".stash" for out in outs}:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
