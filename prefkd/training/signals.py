"""Stage signals: per-unit weights and reference log-probs, one Arrow shard per token shard.

For each pair and side, on the ids of one role (the teacher for CTPD) and its
units (aligned spans, or tokens):

- ``delta_i = l_pos(unit_i) - l_neg(unit_i)`` (sum aggregation) or the same
  with every log-prob divided by the unit's token count (mean aggregation);
- ``weight_i = transform(delta_i)`` with mu = +1 on the chosen response and -1
  on the rejected one (CTPD: ``k * exp(mu * clamp(delta, L, U))``); with
  ``spec.eos_weight`` set, the EOS unit of an untruncated response gets that
  weight instead (TIS-DPO: 0);
- ``ref_logps_i = l_ref(unit_i)`` of the reference model, so the student job
  needs no teacher at all.

Mean aggregation (the CTPD ablation; the authors' ``average_log_prob`` switch) makes
every span log-prob a per-token mean: the delta above, the reference and the
student's own span log-prob in the loss, ``sum_i w_i * (mean l_theta(p_i) -
mean l_ref(p_i))``. The trainer sums the student's token log-probs per unit, so a
span shard folds the student's token count n_i of every unit into what it stores:
``weights = w_i / n_i`` and ``ref_logps = n_i * mean l_ref(p_i)``, which makes the
trainer's ``sum_i weights_i * (sum l_theta(p_i) - ref_logps_i)`` exactly that mean
margin (the shard's metadata says ``prefkd.folded``; its weight statistics describe
``w_i`` itself). Token units have one token each: nothing to fold.

Weights are not rounded. Without pos/neg models the weights are uniform (1):
that is how DPO's reference log-probs are precomputed.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from prefkd.assets.models import load_model
from prefkd.assets.tokenizers import load_tokenizer, pad_id
from prefkd.core.layout import SIDES
from prefkd.core.logprobs import model_token_logps, span_logps
from prefkd.core.weights import WEIGHT_BINS, WeightSpec, transform_weights
from prefkd.data.batches import collate_pairs, unit_ids
from prefkd.errors import PrefkdError
from prefkd.io.files import group_items, write_json
from prefkd.io.shards import make_provenance, read_shard, shard_stats, write_shard
from prefkd.training.settings import SignalSettings, WeightsStatsSettings


@torch.no_grad()
def unit_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """[2B, M] unit log-probs and [2B, M] token counts per unit for a collated pair batch."""

    lp = model_token_logps(model, batch["input_ids"], batch["attention_mask"], needed=batch["unit_ids"] >= 0)
    m = int(batch["num_units"].max())
    units = span_logps(lp, batch["unit_ids"], m)
    counts = span_logps(torch.ones_like(lp), batch["unit_ids"], m)
    return units, counts


def _planted_masks(row: dict, side: str):
    """Per span, True when the span's bytes overlap a planted range (None without planting)."""
    planted = row.get(f"{side}_planted")
    if planted is None:
        return None
    ends = np.asarray(row[f"{side}_span_bytes"], dtype=np.int64)
    starts = np.concatenate([[0], ends[:-1]])
    inside = np.zeros(len(ends), dtype=bool)
    for a, b in planted:
        inside |= (starts < b) & (ends > a)
    return inside


POLICY_ROLE = "student"  # the model trained on signal shards (teacher DPO trains on token units: nothing to fold)


def _policy_counts(row: dict, side: str, m: int) -> np.ndarray:
    """Tokens of the trained (student) model in each of the ``m`` span units of a response (EOS unit: 1)."""
    units, n = unit_ids(row, POLICY_ROLE, side, "span")
    if n != m:
        raise PrefkdError(f"pair {row['pair_id']} {side}: the {POLICY_ROLE} tokens have {n} units but the signals {m}.")
    return np.bincount(units[units >= 0], minlength=m).astype(np.float64)


def _side_values(row, side, d, ref_lp, ref_n, unit, spec) -> dict:
    """One response's stored values: ``{side}_weights``, ``{side}_ref_logps``, ``{side}_delta`` (float32) and the
    weights themselves under ``w`` (for the statistics), from its deltas and reference unit log-probs / counts."""
    mu = 1.0 if side == "chosen" else -1.0
    w = transform_weights(d, mu, spec, row["pair_id"], side, eos=not row[f"{side}_truncated"])
    stored_w, ref = w.astype(np.float64), ref_lp
    if spec.aggregation == "mean":
        ref = ref_lp / np.maximum(ref_n, 1)  # the reference's per-token mean of every unit
        if unit == "span":  # fold the student's token counts (see the module docstring)
            n = _policy_counts(row, side, len(d))
            stored_w, ref = stored_w / n, ref * n
    return {
        f"{side}_weights": stored_w.astype(np.float32),
        f"{side}_ref_logps": ref.astype(np.float32),
        f"{side}_delta": d.astype(np.float32),
        "w": w,
    }


@dataclass
class Scorer:
    """A model and whose token ids (role) it scores."""

    model: object
    role: str
    pad_id: int


def _score_chunk(
    chunk: list[dict], unit: str, pos: Scorer | None, neg: Scorer | None, ref: Scorer, spec: WeightSpec, device
) -> list[dict]:
    """Per row of ``chunk``: its ``{side}_weights``, ``{side}_ref_logps`` and ``{side}_delta`` (numpy)."""
    batches = {}
    for x in (ref, pos, neg):
        if x is not None and x.role not in batches:
            batch = collate_pairs(chunk, x.role, unit, x.pad_id)  # [chosen; rejected] rows
            batches[x.role] = {k: v.to(device) for k, v in batch.items()}
    scored = {}

    def score(x: Scorer):
        key = (id(x.model), x.role)
        if key not in scored:
            scored[key] = unit_logps(x.model, batches[x.role])
        return scored[key]

    ref_units, ref_counts = score(ref)  # [2B, M], [2B, M]
    batch = batches[ref.role]
    if pos is not None:
        (pos_units, pos_counts), (neg_units, neg_counts) = score(pos), score(neg)
        width = min(pos_units.shape[1], neg_units.shape[1])  # same unit counts per row; padding may differ
        pos_units, neg_units = pos_units[:, :width], neg_units[:, :width]  # [2B, M'], [2B, M']
        if spec.aggregation == "mean":  # per-token means: unit log-prob / unit token count
            pos_units = pos_units / pos_counts[:, :width].clamp(min=1)
            neg_units = neg_units / neg_counts[:, :width].clamp(min=1)
        delta = pos_units - neg_units  # [2B, M']
    else:
        delta = torch.zeros_like(ref_units)  # [2B, M]
    n = len(chunk)
    results = []
    for j, row in enumerate(chunk):
        res = {"weights": {}}
        for s_i, side in enumerate(SIDES):
            r = j + s_i * n  # the row of this side in the [chosen; rejected] layout
            m = int(batch["num_units"][r])
            d = delta[r, :m].double().cpu().numpy()
            ref_lp, ref_n = ref_units[r, :m].double().cpu().numpy(), ref_counts[r, :m].double().cpu().numpy()
            values = _side_values(row, side, d, ref_lp, ref_n, unit, spec)
            res["weights"][side] = values.pop("w")
            res.update(values)
        results.append(res)
    return results


def _weight_stats(rows: list[dict], results: list[dict], unit: str) -> dict:
    """Weight histograms per side, and the mean weights inside / outside planted ranges (span units)."""
    hist = {side: np.zeros(len(WEIGHT_BINS), dtype=np.int64) for side in SIDES}
    planted = {side: {"inside_sum": 0.0, "inside_n": 0, "outside_sum": 0.0, "outside_n": 0} for side in SIDES}
    for row, res in zip(rows, results, strict=True):
        for side in SIDES:
            w = res["weights"][side]  # the weights themselves (a mean-aggregation shard stores them folded)
            hist[side] += np.bincount(
                np.minimum(np.digitize(w, WEIGHT_BINS) - 1, len(WEIGHT_BINS) - 1).clip(0), minlength=len(WEIGHT_BINS)
            )
            inside = _planted_masks(row, side) if unit == "span" else None
            if inside is not None:
                ins = np.zeros(len(w), dtype=bool)  # the EOS unit (if any) is outside every planted range
                ins[: len(inside)] = inside
                p = planted[side]
                p["inside_sum"] += float(w[ins].sum())
                p["inside_n"] += int(ins.sum())
                p["outside_sum"] += float(w[~ins].sum())
                p["outside_n"] += int((~ins).sum())
    return {
        "pairs": len(rows),
        "weight_bins": WEIGHT_BINS.tolist(),
        "weight_hist": {side: hist[side].tolist() for side in SIDES},
        "planted": planted,
        "weight_sum": {side: float(sum(float(r["weights"][side].sum()) for r in results)) for side in SIDES},
        "units": {side: int(sum(len(r["weights"][side]) for r in results)) for side in SIDES},
    }


def compute_signals(
    rows: list[dict],
    unit: str,
    pos: Scorer | None,
    neg: Scorer | None,
    ref: Scorer,
    spec: WeightSpec,
    batch_size: int = 8,
    device="cpu",
):
    """Signals for a list of token-shard rows. ``pos``/``neg`` may be None (uniform or random weights).

    Each scorer reads its own role's ids. With span units the roles may differ (the
    spans are shared: a teacher pi+ against a student pi-, or a student reference);
    with token units all scorers must share one role.
    """
    if (pos is None) != (neg is None):
        raise PrefkdError("give both a positive and a negative model, or neither.")
    if unit == "token" and len({x.role for x in (ref, pos, neg) if x is not None}) > 1:
        raise PrefkdError("token units need every model to score the same role's ids; use span units to mix roles.")
    if pos is None and spec.transform not in ("uniform", "random"):
        spec = WeightSpec(**{**asdict(spec), "transform": "uniform"})
    role = ref.role
    # Batch rows of similar length together (less padding); results go back in row order.
    order = sorted(
        range(len(rows)),
        key=lambda i: len(rows[i][f"{role}_chosen_input_ids"]) + len(rows[i][f"{role}_rejected_input_ids"]),
    )
    by_row: dict[int, dict] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        by_row.update(zip(idx, _score_chunk([rows[i] for i in idx], unit, pos, neg, ref, spec, device), strict=True))
    results = [by_row[i] for i in range(len(rows))]
    columns = {"pair_id": pa.array([r["pair_id"] for r in rows], type=pa.int64())}
    for side in SIDES:
        for name in ("weights", "ref_logps", "delta"):
            key = f"{side}_{name}"
            columns[key] = pa.array([r[key].tolist() for r in results], type=pa.list_(pa.float32()))
    return pa.table(columns), _weight_stats(rows, results, unit)


SIGNAL_COLUMNS = tuple(f"{side}_{name}" for side in SIDES for name in ("weights", "ref_logps", "delta"))


def check_finite(signals: pa.Table, out: Path) -> None:
    """Stop before ``out`` is written when a weight, delta or reference log-prob is NaN or infinite."""
    for name in SIGNAL_COLUMNS:
        column = signals.column(name).combine_chunks()  # list<float32>, one list per row
        values = column.flatten().to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            offsets = column.offsets.to_numpy() - column.offsets[0].as_py()
            row = int(np.searchsorted(offsets, bad[0], side="right")) - 1
            pair_id = signals.column("pair_id")[row].as_py()
            raise PrefkdError(
                f"signals for {out} are not finite: column {name!r} holds {values[bad[0]]} at pair_id {pair_id}"
                " (one of its models gives NaN or infinite log-probs), so nothing was written."
            )


def run_shard(
    tokens: Path,
    out: Path,
    role: str,
    unit: str,
    reference: str,
    pos: str | None,
    neg: str | None,
    spec: WeightSpec,
    batch_size: int = 8,
    roles: dict | None = None,
) -> dict:
    """One signal shard. ``role`` scores every model unless ``roles`` ({"ref"|"pos"|"neg": role}) says otherwise."""

    torch.manual_seed(spec.seed)
    table = read_shard(tokens, "tokens")
    rows = table.to_pylist()
    roles = {"ref": role, "pos": role, "neg": role, **(roles or {})}
    loaded: dict[str, object] = {}

    def get(path, name):
        if path is None:
            return None
        key = str(Path(path).resolve())
        if key not in loaded:
            model = load_model(path)
            model.eval()
            loaded[key] = model
        return Scorer(loaded[key], roles[name], pad_id(load_tokenizer(path)))

    ref_s, pos_s, neg_s = get(reference, "ref"), get(pos, "pos"), get(neg, "neg")
    signals, stats = compute_signals(rows, unit, pos_s, neg_s, ref_s, spec, batch_size)
    meta = {
        b"prefkd.unit": unit.encode(),
        b"prefkd.role": roles["ref"].encode(),
        b"prefkd.roles": json.dumps(roles, sort_keys=True).encode(),
        b"prefkd.spec": json.dumps(asdict(spec), sort_keys=True).encode(),
    }
    if spec.aggregation == "mean" and unit == "span":
        meta[b"prefkd.folded"] = f"{POLICY_ROLE} token counts".encode()
    signals = signals.replace_schema_metadata(meta)
    check_finite(signals, out)
    stats.update(unit=unit, role=roles["ref"], roles=roles, spec=asdict(spec))
    models = {
        f"{name}_model_config": Path(path) / "config.json"
        for name, path in (("ref", reference), ("pos", pos), ("neg", neg))
        if path
    }
    inputs = {"tokens": tokens, **{k: v for k, v in models.items() if v.is_file()}}
    settings = dict(unit=unit, roles=roles, spec=asdict(spec), batch_size=batch_size)
    write_shard(signals, out, kind="signals", stats=stats, provenance=make_provenance(out, settings, inputs))
    return stats


def merge_weight_stats(parts: list[dict]) -> dict:
    """Weight histograms per side and the planted-difference check, summed over shards."""
    out = {"pairs": sum(p["pairs"] for p in parts), "weight_bins": parts[0]["weight_bins"] if parts else []}
    out["weight_hist"] = {side: np.sum([p["weight_hist"][side] for p in parts], axis=0).tolist() for side in SIDES}
    out["mean_weight"] = {
        side: sum(p["weight_sum"][side] for p in parts) / max(1, sum(p["units"][side] for p in parts)) for side in SIDES
    }
    check = {}
    for side in SIDES:
        agg = Counter()
        for p in parts:
            agg.update(p["planted"][side])
        if agg["inside_n"]:
            inside = agg["inside_sum"] / agg["inside_n"]
            outside = agg["outside_sum"] / max(1, agg["outside_n"])
            check[side] = {
                "inside": inside,
                "outside": outside,
                "inside_units": agg["inside_n"],
                "outside_units": agg["outside_n"],
            }
    if check:
        # mu = +1 on chosen, -1 on rejected: on both sides the weight is high where the pair
        # disagrees (good text in chosen, bad text in rejected), so inside > outside on both
        check["finds_planted_differences"] = all(
            check.get(side, {}).get("inside", 0) > check.get(side, {}).get("outside", float("inf")) for side in SIDES
        )
    out["planted_check"] = check
    if parts:
        out["unit"] = parts[0].get("unit")
        out["spec"] = parts[0].get("spec")
    return out


def run(s: SignalSettings) -> int:
    stats = run_shard(
        Path(s.tokens), Path(s.out), s.role, s.unit, s.reference, s.pos, s.neg, s.spec(), s.batch_size, s.roles()
    )
    print(json.dumps({"pairs": stats["pairs"], "units": stats["units"]}))
    return 0


def run_gather(s: WeightsStatsSettings) -> int:
    groups = group_items(s.shards, "SET")
    report = {name: merge_weight_stats([shard_stats(p) for p in paths]) for name, paths in groups.items()}
    write_json(Path(s.out), report)
    print(json.dumps({name: r.get("planted_check", {}) for name, r in report.items()}))
    return 0
