"""The Arrow shard contracts between stages, written down once.

A token shard holds one row per preference pair (see ``TOKEN_SCHEMA``); a
signal shard (later stages) adds per-span teacher values keyed by ``pair_id``.
Shards are Arrow IPC files, written atomically (temp name, then rename), with
deterministic bytes for deterministic inputs. Readers validate the schema so a
stale or foreign file fails with one sentence instead of deep inside a stage.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from prefkd.core.layout import ROLES, SIDES
from prefkd.core.settings import setting
from prefkd.errors import PrefkdError

STATS_KEY = b"prefkd.stats"
KIND_KEY = b"prefkd.kind"

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


def write_shard(table: pa.Table, path: str | Path, kind: str, stats: dict | None = None) -> None:
    """Write ``table`` as an Arrow IPC file atomically, with optional stats in its metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(table.schema.metadata or {})
    meta[KIND_KEY] = kind.encode()
    if stats is not None:
        meta[STATS_KEY] = json.dumps(stats, sort_keys=True).encode()
    table = table.replace_schema_metadata(meta)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with pa.OSFile(str(tmp), "wb") as sink:
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    os.replace(tmp, path)


def read_shard(path: str | Path, kind: str = "tokens") -> pa.Table:
    """Read and validate a shard written by ``write_shard``."""
    path = Path(path)
    if not path.exists():
        raise PrefkdError(f"shard {path} does not exist; run the stage that writes it first.")
    try:
        with pa.memory_map(str(path), "r") as source:
            table = pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid as exc:
        raise PrefkdError(f"shard {path} is not a readable Arrow IPC file ({exc}); delete it and rerun its stage.") from exc
    found = (table.schema.metadata or {}).get(KIND_KEY, b"").decode()
    if found != kind:
        raise PrefkdError(f"shard {path} holds {found or 'unknown'!r} data, expected {kind!r}.")
    expected = TOKEN_SCHEMA if kind == "tokens" else None
    if expected is not None:
        for field in expected:
            if field.name not in table.column_names:
                raise PrefkdError(f"shard {path} lacks column {field.name!r}; it was written by another prefkd version, rerun its stage.")
            if table.schema.field(field.name).type != field.type:
                raise PrefkdError(
                    f"shard {path} column {field.name!r} has type {table.schema.field(field.name).type}, expected {field.type}."
                )
    return table


def shard_stats(path: str | Path) -> dict:
    """The stats dict stored in a shard's metadata (empty if none)."""
    with pa.memory_map(str(path), "r") as source:
        meta = pa.ipc.open_file(source).schema.metadata or {}
    raw = meta.get(STATS_KEY)
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
    with pa.memory_map(str(src), "r") as source:
        kind = (pa.ipc.open_file(source).schema.metadata or {}).get(KIND_KEY, b"tokens").decode()
    table = read_shard(src, kind)
    swapped = swap_sides(table)
    meta = dict(swapped.schema.metadata or {})
    meta[b"prefkd.reversed"] = b"true" if meta.get(b"prefkd.reversed") != b"true" else b"false"
    stats = json.loads(meta.pop(STATS_KEY)) if STATS_KEY in meta else None
    write_shard(swapped.replace_schema_metadata(meta), dst, kind=kind, stats=stats)
    return swapped.num_rows


@dataclass(kw_only=True)
class ReverseSettings:
    """Settings of ``prefkd reverse``."""

    src: Path = setting(doc="token or signal shard", flag="--in")
    out: Path = setting(doc="reversed shard to write")


def run_reverse(args: ReverseSettings) -> int:
    rows = reverse_shard(args.src, args.out)
    print(f"wrote {args.out}: {rows} pairs with chosen and rejected exchanged")
    return 0
