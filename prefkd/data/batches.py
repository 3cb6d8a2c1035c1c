"""From token (and signal) shards to padded training batches.

Units: the preference loss sums over *units* of a response. ``unit="span"``
uses the aligned spans of the token shard plus, when the response was not
truncated, one final unit for EOS (the same on both models: both end after the
same text). ``unit="token"`` makes every response token (EOS included) its own
unit: DPO and TIS-DPO. Prompt and padding positions have unit id -1.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import torch

from prefkd.core.layout import SIDES, UNITS
from prefkd.errors import PrefkdError
from prefkd.io.shards import read_shard


def unit_ids(row: dict, role: str, side: str, unit: str) -> tuple[np.ndarray, int]:
    """Unit id of every token of ``{role}_{side}_input_ids`` and the number of units."""
    ids = row[f"{role}_{side}_input_ids"]
    p = row[f"{role}_prompt_len"]
    n = len(ids)
    out = np.full(n, -1, dtype=np.int64)
    if unit == "token":
        out[p:] = np.arange(n - p)
        return out, n - p
    if unit != "span":
        raise PrefkdError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}.")
    span = np.asarray(row[f"{role}_{side}_span_ids"], dtype=np.int64)
    out[:] = span
    m = row[f"{side}_num_spans"]
    own = int(span.max()) + 1 if len(span) else 0
    if own != m:
        raise PrefkdError(
            f"pair {row['pair_id']} {side}: the {role} tokens have {own} spans but the pair has {m}; "
            "the row mixes columns of different pairs (misaligned)."
        )
    if not row[f"{side}_truncated"]:
        out[n - 1] = m  # EOS is the last unit
        m += 1
    return out, m


class PairTable:
    """All rows of some token shards (optionally joined with signal shards by pair_id)."""

    def __init__(
        self,
        token_paths: Sequence[str | Path],
        signal_paths: Sequence[str | Path] | None = None,
        ref_paths: Sequence[str | Path] | None = None,
    ):
        """``ref_paths``: other signal shards whose reference log-probs replace those of
        ``signal_paths`` (e.g. CTPD weights with the student's own SFT as reference)."""
        if not token_paths:
            raise PrefkdError("no token shards given.")
        self.table = pa.concat_tables([read_shard(p, "tokens") for p in token_paths])
        self.pair_ids = self.table.column("pair_id").to_numpy()
        self.signals = None
        self.signal_unit = None
        if signal_paths:
            self.signals = self._joined(signal_paths)
            self.signal_unit = (self.signals.schema.metadata or {}).get(b"prefkd.unit", b"").decode()
            if ref_paths:
                ref = self._joined(ref_paths)
                for side in SIDES:
                    name = f"{side}_ref_logps"
                    self.signals = self.signals.set_column(
                        self.signals.column_names.index(name), name, ref.column(name)
                    )

    def _joined(self, paths) -> pa.Table:
        """Signal shards reordered to this table's pair order; every pair must be there."""
        sig = pa.concat_tables([read_shard(p, "signals") for p in paths])
        index = {int(pid): i for i, pid in enumerate(sig.column("pair_id").to_numpy())}
        missing = [int(p) for p in self.pair_ids if int(p) not in index]
        if missing:
            raise PrefkdError(
                f"the signal shards lack {len(missing)} of {len(self.pair_ids)} pairs (e.g. pair_id {missing[0]}); rerun the signals stage."
            )
        return sig.take(pa.array([index[int(p)] for p in self.pair_ids], type=pa.int64()))

    def __len__(self) -> int:
        return self.table.num_rows

    def rows(self, indices: Iterable[int]) -> list[dict]:
        idx = pa.array(list(indices), type=pa.int64())
        rows = self.table.take(idx).to_pylist()
        if self.signals is not None:
            for row, sig in zip(rows, self.signals.take(idx).to_pylist()):
                if sig["pair_id"] != row["pair_id"]:
                    raise PrefkdError(
                        f"signal row {sig['pair_id']} is joined to token row {row['pair_id']}; the shards are misaligned."
                    )
                row["signals"] = sig
        return rows


def _pad(seqs: list[np.ndarray], value, dtype=torch.long) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=dtype)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(np.asarray(s), dtype=dtype)
    return out


def collate_pairs(rows: list[dict], role: str, unit: str, pad_id: int, with_signals: bool = False) -> dict:
    """A preference batch: chosen rows first, then rejected rows ([2B, T])."""
    seqs, units, counts = [], [], []
    for side in SIDES:
        for row in rows:
            seqs.append(np.asarray(row[f"{role}_{side}_input_ids"]))
            u, m = unit_ids(row, role, side, unit)
            units.append(u)
            counts.append(m)
    input_ids = _pad(seqs, pad_id)
    attention = _pad([np.ones(len(s)) for s in seqs], 0)
    batch = {
        "pair_id": torch.tensor([r["pair_id"] for r in rows], dtype=torch.long),
        "input_ids": input_ids,
        "attention_mask": attention,
        "unit_ids": _pad(units, -1),
        "num_units": torch.tensor(counts, dtype=torch.long),
    }
    if with_signals:
        weights, refs = [], []
        for side in SIDES:
            for row, m in zip(rows, counts[: len(rows)] if side == "chosen" else counts[len(rows) :]):
                sig = row["signals"]
                w, r = sig[f"{side}_weights"], sig[f"{side}_ref_logps"]
                if len(w) != m or len(r) != m:
                    raise PrefkdError(
                        f"pair {row['pair_id']} {side}: {len(w)} weights for {m} {unit} units; signals and tokens disagree (misaligned batch)."
                    )
                weights.append(np.asarray(w, dtype=np.float32))
                refs.append(np.asarray(r, dtype=np.float32))
        batch["weights"] = _pad(weights, 0.0, torch.float32)
        batch["ref_logps"] = _pad(refs, 0.0, torch.float32)
    m = int(batch["num_units"].max())
    batch["unit_mask"] = (torch.arange(m)[None, :] < batch["num_units"][:, None]).float()
    return batch


def collate_chosen_views(rows: list[dict], student_pad: int, teacher_pad: int) -> tuple[dict, dict]:
    """Student and teacher views of the same chosen responses, for a KD term.

    Both carry span units (shared across tokenizers); a row whose two views
    disagree on the number of units is a misaligned batch and stops the run.
    """
    views = []
    for role, pad in (("student", student_pad), ("teacher", teacher_pad)):
        b = collate_pairs(rows, role, "span", pad)
        n = len(rows)
        view = {k: b[k][:n] for k in ("input_ids", "attention_mask", "unit_ids", "num_units")}
        view["target_mask"] = (view["unit_ids"] >= 0).float()
        view["pair_id"] = b["pair_id"]
        views.append(view)
    student, teacher = views
    bad = (student["num_units"] != teacher["num_units"]).nonzero().flatten().tolist()
    if bad:
        raise PrefkdError(
            f"pair {rows[bad[0]]['pair_id']}: the student view has {int(student['num_units'][bad[0]])} spans, "
            f"the teacher view {int(teacher['num_units'][bad[0]])}; teacher and student rows are misaligned."
        )
    return student, teacher


def collate_sft(rows: list[dict], role: str, pad_id: int) -> dict:
    """An SFT batch on the chosen responses: labels are the response tokens (EOS included)."""
    seqs = [np.asarray(r[f"{role}_chosen_input_ids"]) for r in rows]
    input_ids = _pad(seqs, pad_id)
    label_mask = torch.zeros_like(input_ids, dtype=torch.float32)
    for i, (s, r) in enumerate(zip(seqs, rows)):
        label_mask[i, r[f"{role}_prompt_len"] : len(s)] = 1.0
    return {
        "pair_id": torch.tensor([r["pair_id"] for r in rows], dtype=torch.long),
        "input_ids": input_ids,
        "attention_mask": _pad([np.ones(len(s)) for s in seqs], 0),
        "label_mask": label_mask,
    }


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A deterministic shuffle of range(n) for one epoch."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order
