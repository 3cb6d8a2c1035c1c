"""Stage signals: per-unit weights and reference log-probs, one Arrow shard per token shard.

For each pair and side, on the ids of one role (the teacher for CTPD) and its
units (aligned spans, or tokens):

- ``delta_i = l_pos(unit_i) - l_neg(unit_i)`` (sum aggregation) or the same
  divided by the unit's token count (mean aggregation);
- ``weight_i = transform(delta_i)`` with mu = +1 on the chosen response and -1
  on the rejected one (CTPD: ``k * exp(mu * clamp(delta, L, U))``);
- ``ref_logps_i = l_ref(unit_i)`` of the reference model, so the student job
  needs no teacher at all.

Weights are not rounded. Without pos/neg models the weights are uniform (1):
that is how DPO's reference log-probs are precomputed.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from prefkd.errors import PrefkdError
from prefkd.files import group_items, write_json
from prefkd.shards import SIDES, read_shard, shard_stats, write_shard

TRANSFORMS = ("ctpd", "identity", "threshold", "threshold_scale", "binary_top", "rank", "random", "uniform")
AGGREGATIONS = ("sum", "mean")
WEIGHT_BINS = np.round(np.linspace(0.0, 5.0, 26), 2)  # histogram edges; values above 5 land in the last bin


@dataclass
class WeightSpec:
    transform: str = "ctpd"
    aggregation: str = "sum"
    k: float = 1.0
    lower: float = -0.5  # L
    upper: float = 1.5  # U
    threshold: float = 0.1  # |delta| below this counts as no evidence (threshold transforms)
    top_fraction: float = 0.3  # binary_top: share of units that get the high weight
    seed: int = 1

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise PrefkdError(f"weight transform must be one of {', '.join(TRANSFORMS)}, got {self.transform!r}.")
        if self.aggregation not in AGGREGATIONS:
            raise PrefkdError(f"weight aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}.")
        if self.lower > self.upper:
            raise PrefkdError(f"the weight clamp needs lower <= upper, got L={self.lower}, U={self.upper}.")


def transform_weights(delta: np.ndarray, mu: float, spec: WeightSpec, pair_id: int = 0, side: str = "chosen") -> np.ndarray:
    """Weights of the units of one response from their deltas (float64 in, float32 out).

    - ``ctpd``: k * exp(mu * clamp(delta, L, U))  (the CTPD / TIS-DPO estimator)
    - ``identity``: k * exp(mu * delta), unclamped
    - ``threshold``: as ctpd, but units with |delta| < threshold get k (no evidence)
    - ``threshold_scale``: threshold, then scaled so the response's mean weight is k
    - ``binary_top``: k * exp(U) for the top ``top_fraction`` of units by mu * delta, k * exp(L) for the rest
    - ``rank``: k * exp(L + (U - L) * r), r in [0, 1] the rank of mu * delta within the response
    - ``random``: k * exp(mu * u), u ~ Uniform(L, U), seeded by (seed, pair_id, side)
    - ``uniform``: k
    """
    d = np.asarray(delta, dtype=np.float64)
    s = spec
    t = s.transform
    if t == "uniform" or len(d) == 0:
        w = np.full(len(d), s.k)
    elif t == "ctpd":
        w = s.k * np.exp(mu * np.clip(d, s.lower, s.upper))
    elif t == "identity":
        w = s.k * np.exp(mu * d)
    elif t in ("threshold", "threshold_scale"):
        w = s.k * np.exp(mu * np.clip(d, s.lower, s.upper))
        w = np.where(np.abs(d) < s.threshold, s.k, w)
        if t == "threshold_scale":
            w = w * (s.k / w.mean())
    elif t == "binary_top":
        score = mu * d
        n_top = max(1, int(round(s.top_fraction * len(d))))
        top = np.argsort(-score, kind="stable")[:n_top]
        w = np.full(len(d), s.k * np.exp(s.lower))
        w[top] = s.k * np.exp(s.upper)
    elif t == "rank":
        score = mu * d
        ranks = np.argsort(np.argsort(score, kind="stable"), kind="stable")
        r = ranks / max(len(d) - 1, 1)
        w = s.k * np.exp(s.lower + (s.upper - s.lower) * r)
    elif t == "random":
        rng = np.random.default_rng([s.seed, int(pair_id) & 0x7FFFFFFF, SIDES.index(side)])
        w = s.k * np.exp(mu * rng.uniform(s.lower, s.upper, size=len(d)))
    else:  # pragma: no cover - validated in WeightSpec
        raise AssertionError(t)
    return w.astype(np.float32)


@torch.no_grad()
def unit_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """[2B, M] unit log-probs and [2B, M] token counts per unit for a collated pair batch."""
    from prefkd.losses import model_token_logps, span_logps

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


@dataclass
class Scorer:
    """A model and whose token ids (role) it scores."""

    model: object
    role: str
    pad_id: int


def compute_signals(rows: list[dict], unit: str, pos: Scorer | None, neg: Scorer | None, ref: Scorer, spec: WeightSpec, batch_size: int = 8, device="cpu"):
    """Signals for a list of token-shard rows. ``pos``/``neg`` may be None (uniform or random weights).

    Each scorer reads its own role's ids. With span units the roles may differ (the
    spans are shared: a teacher pi+ against a student pi-, or a student reference);
    with token units all scorers must share one role.
    """
    from prefkd.batches import collate_pairs

    if (pos is None) != (neg is None):
        raise PrefkdError("give both a positive and a negative model, or neither.")
    scorers = [x for x in (ref, pos, neg) if x is not None]
    if unit == "token" and len({x.role for x in scorers}) > 1:
        raise PrefkdError("token units need every model to score the same role's ids; use span units to mix roles.")
    if pos is None and spec.transform not in ("uniform", "random"):
        spec = WeightSpec(**{**asdict(spec), "transform": "uniform"})
    out = {f"{side}_{name}": [] for side in SIDES for name in ("weights", "ref_logps", "delta")}
    hist = {side: np.zeros(len(WEIGHT_BINS), dtype=np.int64) for side in SIDES}
    planted = {side: {"inside_sum": 0.0, "inside_n": 0, "outside_sum": 0.0, "outside_n": 0} for side in SIDES}
    role = ref.role
    # Batch rows of similar length together (less padding); results go back in row order.
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][f"{role}_chosen_input_ids"]) + len(rows[i][f"{role}_rejected_input_ids"]))
    results: dict[int, dict] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        chunk = [rows[i] for i in idx]
        batches = {}
        for x in scorers:
            if x.role not in batches:
                batch = collate_pairs(chunk, x.role, unit, x.pad_id)
                batches[x.role] = {k: v.to(device) for k, v in batch.items()}
        scored = {}

        def score(x: Scorer):
            key = (id(x.model), x.role)
            if key not in scored:
                scored[key] = unit_logps(x.model, batches[x.role])
            return scored[key]

        ref_units, _ = score(ref)
        batch = batches[role]
        if pos is not None:
            (pos_units, pos_counts), (neg_units, neg_counts) = score(pos), score(neg)
            width = min(pos_units.shape[1], neg_units.shape[1])  # same unit counts per row; padding may differ
            if spec.aggregation == "mean":
                delta = pos_units[:, :width] / pos_counts[:, :width].clamp(min=1) - neg_units[:, :width] / neg_counts[:, :width].clamp(min=1)
            else:
                delta = pos_units[:, :width] - neg_units[:, :width]
        else:
            delta = torch.zeros_like(ref_units)
        n = len(chunk)
        for j, i in enumerate(idx):
            res = {}
            for s_i, side in enumerate(SIDES):
                r = j + s_i * n
                m = int(batch["num_units"][r])
                d = delta[r, :m].double().cpu().numpy()
                mu = 1.0 if side == "chosen" else -1.0
                w = transform_weights(d, mu, spec, rows[i]["pair_id"], side)
                res[f"{side}_weights"] = w
                res[f"{side}_ref_logps"] = ref_units[r, :m].float().cpu().numpy()
                res[f"{side}_delta"] = d.astype(np.float32)
            results[i] = res
    for i, row in enumerate(rows):
        res = results[i]
        for key, value in res.items():
            out[key].append(value)
        for side in SIDES:
            w = res[f"{side}_weights"]
            hist[side] += np.bincount(np.minimum(np.digitize(w, WEIGHT_BINS) - 1, len(WEIGHT_BINS) - 1).clip(0), minlength=len(WEIGHT_BINS))
            inside = _planted_masks(row, side) if unit == "span" else None
            if inside is not None:
                ins = np.zeros(len(w), dtype=bool)  # the EOS unit (if any) is outside every planted range
                ins[: len(inside)] = inside
                p = planted[side]
                p["inside_sum"] += float(w[ins].sum())
                p["inside_n"] += int(ins.sum())
                p["outside_sum"] += float(w[~ins].sum())
                p["outside_n"] += int((~ins).sum())
    columns = {"pair_id": pa.array([r["pair_id"] for r in rows], type=pa.int64())}
    for key, values in out.items():
        columns[key] = pa.array([v.tolist() for v in values], type=pa.list_(pa.float32()))
    stats = {
        "pairs": len(rows),
        "weight_bins": WEIGHT_BINS.tolist(),
        "weight_hist": {side: hist[side].tolist() for side in SIDES},
        "planted": planted,
        "weight_sum": {side: float(sum(float(v.sum()) for v in out[f"{side}_weights"])) for side in SIDES},
        "units": {side: int(sum(len(v) for v in out[f"{side}_weights"])) for side in SIDES},
    }
    return pa.table(columns), stats


def run_shard(tokens: Path, out: Path, role: str, unit: str, reference: str, pos: str | None, neg: str | None, spec: WeightSpec, batch_size: int = 8, roles: dict | None = None) -> dict:
    """One signal shard. ``role`` scores every model unless ``roles`` ({"ref"|"pos"|"neg": role}) says otherwise."""
    from prefkd.models import load_model
    from prefkd.tokenizers import load_tokenizer, pad_id

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
    signals = signals.replace_schema_metadata(meta)
    stats.update(unit=unit, role=roles["ref"], roles=roles, spec=asdict(spec))
    write_shard(signals, out, kind="signals", stats=stats)
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
            check[side] = {"inside": inside, "outside": outside, "inside_units": agg["inside_n"], "outside_units": agg["outside_n"]}
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", required=True, type=Path, help="token shard")
    p.add_argument("--out", required=True, type=Path, help="signal shard to write")
    p.add_argument("--role", choices=("teacher", "student"), default="teacher", help="whose ids every model scores")
    for name in ("ref", "pos", "neg"):
        p.add_argument(f"--{name}-role", choices=("teacher", "student"), default=None, help=f"override --role for the {name} model")
    p.add_argument("--unit", choices=("span", "token"), default="span")
    p.add_argument("--reference", required=True, help="reference model dir (its unit log-probs are stored)")
    p.add_argument("--pos", default=None, help="positive contrastive model dir (pi+)")
    p.add_argument("--neg", default=None, help="negative contrastive model dir (pi-)")
    p.add_argument("--batch-size", type=int, default=8)
    d = WeightSpec()
    p.add_argument("--transform", default=d.transform, choices=TRANSFORMS)
    p.add_argument("--aggregation", default=d.aggregation, choices=AGGREGATIONS)
    for name in ("k", "lower", "upper", "threshold", "top_fraction"):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(d, name))
    p.add_argument("--seed", type=int, default=d.seed)


def run(args) -> int:
    spec = WeightSpec(args.transform, args.aggregation, args.k, args.lower, args.upper, args.threshold, args.top_fraction, args.seed)
    roles = {name: getattr(args, f"{name}_role") for name in ("ref", "pos", "neg") if getattr(args, f"{name}_role")}
    stats = run_shard(args.tokens, args.out, args.role, args.unit, args.reference, args.pos, args.neg, spec, args.batch_size, roles)
    print(json.dumps({"pairs": stats["pairs"], "units": stats["units"]}))
    return 0


def add_gather_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="weights report (json)")
    p.add_argument("shards", nargs="+", help="SET=SHARD.arrow items (SET names the signal set)")


def run_gather(args) -> int:
    groups = group_items(args.shards, "SET")
    report = {name: merge_weight_stats([shard_stats(p) for p in paths]) for name, paths in groups.items()}
    write_json(args.out, report)
    print(json.dumps({name: r.get("planted_check", {}) for name, r in report.items()}))
    return 0
