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

With ``spec.contrast == "sides"`` (CTPD-Lite) there is no pos/neg pair: the
reference model (the teacher SFT) scores both responses and
``s_i = l_ref(p_i^chosen) - l_ref(p_i^rejected)`` for the spans paired by index;
the chosen span gets ``transform(s_i)`` with mu = +1, the rejected one mu = -1,
and the unpaired tail spans and the EOS unit get weight 1
(prefkd.core.weights.side_contrast_weights). Both sides store ``s_i`` as their
delta (0 on the unpaired units).

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

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from prefkd.assets.models import load_model, pick_device
from prefkd.assets.tokenizers import load_tokenizer, pad_id
from prefkd.core.layout import SIDES
from prefkd.core.logprobs import model_token_logps, span_logps
from prefkd.core.weights import (
    WEIGHT_BINS,
    WeightSpec,
    normalize_weights,
    side_contrast_weights,
    transform_weights,
)
from prefkd.data.batches import collate_pairs, unit_ids
from prefkd.errors import PrefkdError
from prefkd.io.files import group_items, write_json
from prefkd.io.shards import (
    ShardStash,
    make_provenance,
    paired_shards,
    path_identity,
    read_shard,
    shard_stats,
    write_shard,
)
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


def _side_values(row, side, d, ref_lp, ref_n, unit, spec, w=None) -> dict:
    """One response's stored values: ``{side}_weights``, ``{side}_ref_logps``, ``{side}_delta`` (float32) and the
    weights themselves under ``w`` (for the statistics), from its deltas and reference unit log-probs / counts
    (``w``: weights computed already, CTPD-Lite's)."""
    mu = 1.0 if side == "chosen" else -1.0
    if w is None:
        w = transform_weights(d, mu, spec, row["pair_id"], side, eos=not row[f"{side}_truncated"])
    w = normalize_weights(w, spec.normalize)
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


def _collate(chunk: list[dict], x: Scorer, unit: str, device) -> dict:
    batch = collate_pairs(chunk, x.role, unit, x.pad_id)  # [chosen; rejected] rows
    return {k: v.to(device) for k, v in batch.items()}


def score_chunks(x: Scorer, rows: list[dict], chunks: list[list[int]], unit: str, device) -> list[tuple]:
    """One model's ([2B, M] unit log-probs, [2B, M] token counts, [2B] units per row) of every chunk of
    ``rows``, kept on the CPU (what a job that scores with one model at a time holds between models)."""
    out = []
    for idx in chunks:
        batch = _collate([rows[i] for i in idx], x, unit, device)
        units, counts = unit_logps(x.model, batch)
        out.append((units.cpu(), counts.cpu(), batch["num_units"].cpu()))
    return out


def _sides_chunk(chunk: list[dict], unit: str, ref: tuple, spec: WeightSpec) -> list[dict]:
    """CTPD-Lite's ``_combine_chunk``: the reference model's unit log-probs of the chosen response against those
    of the rejected one, spans paired by index (prefkd.core.weights.side_contrast_weights)."""
    ref_units, ref_counts, num_units = ref  # [2B, M], [2B, M], [2B]
    n = len(chunk)
    results = []
    for j, row in enumerate(chunk):
        lp, cnt, eos = {}, {}, {}
        for s_i, side in enumerate(SIDES):
            r, m = j + s_i * n, int(num_units[j + s_i * n])
            lp[side], cnt[side] = ref_units[r, :m].double().numpy(), ref_counts[r, :m].double().numpy()
            eos[side] = not row[f"{side}_truncated"]
        score = {side: lp[side] / np.maximum(cnt[side], 1) for side in SIDES} if spec.aggregation == "mean" else lp
        d_c, d_r, w_c, w_r = side_contrast_weights(
            score["chosen"], score["rejected"], spec, (eos["chosen"], eos["rejected"]), row["pair_id"]
        )
        res = {"weights": {}}
        for side, d, w in (("chosen", d_c, w_c), ("rejected", d_r, w_r)):
            values = _side_values(row, side, d, lp[side], cnt[side], unit, spec, w)
            res["weights"][side] = values.pop("w")
            res.update(values)
        results.append(res)
    return results


def _combine_chunk(chunk: list[dict], unit: str, ref: tuple, pair: tuple | None, spec: WeightSpec):
    """Per row of ``chunk``: its ``{side}_weights``, ``{side}_ref_logps`` and ``{side}_delta`` (numpy), from the
    reference's scores and the (pos, neg) scores of the chunk (None: no contrastive pair)."""
    if pair is None and spec.contrast == "sides":
        return _sides_chunk(chunk, unit, ref, spec)
    ref_units, ref_counts, num_units = ref  # [2B, M], [2B, M], [2B]
    if pair is not None:
        (pos_units, pos_counts, _), (neg_units, neg_counts, _) = pair
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
            m = int(num_units[r])
            d = delta[r, :m].double().numpy()
            ref_lp, ref_n = ref_units[r, :m].double().numpy(), ref_counts[r, :m].double().numpy()
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


def _check_scorers(unit: str, pos, neg, ref, contrast: str = "models") -> None:
    if (pos is None) != (neg is None):
        raise PrefkdError("give both a positive and a negative model, or neither.")
    if contrast == "sides" and (pos is not None or unit != "span"):
        raise PrefkdError(
            "the sides contrast (CTPD-Lite) scores both responses with the reference model alone, on span units;"
            " drop --pos/--neg and use --unit span."
        )
    if unit == "token" and len({x.role for x in (ref, pos, neg) if x is not None}) > 1:
        raise PrefkdError("token units need every model to score the same role's ids; use span units to mix roles.")


def row_chunks(rows: list[dict], role: str, batch_size: int) -> list[list[int]]:
    """Row indices in batches of similar length on ``role``'s ids (less padding); every model scores the same
    batches, so a job scoring one model at a time gets the numbers of one scoring them side by side."""
    order = sorted(
        range(len(rows)),
        key=lambda i: len(rows[i][f"{role}_chosen_input_ids"]) + len(rows[i][f"{role}_rejected_input_ids"]),
    )
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def assemble_signals(rows, chunks, unit, ref_scores, pair_scores, spec: WeightSpec):
    """The signal table and weight statistics of ``rows`` from every model's chunk scores (``pair_scores``:
    (pos, neg) or None)."""
    if pair_scores is None and spec.contrast == "models" and spec.transform not in ("uniform", "random"):
        spec = WeightSpec(**{**asdict(spec), "transform": "uniform"})
    by_row: dict[int, dict] = {}
    for c, idx in enumerate(chunks):
        pair = (pair_scores[0][c], pair_scores[1][c]) if pair_scores else None
        by_row.update(zip(idx, _combine_chunk([rows[i] for i in idx], unit, ref_scores[c], pair, spec), strict=True))
    results = [by_row[i] for i in range(len(rows))]
    columns = {"pair_id": pa.array([r["pair_id"] for r in rows], type=pa.int64())}
    for side in SIDES:
        for name in ("weights", "ref_logps", "delta"):
            key = f"{side}_{name}"
            columns[key] = pa.array([r[key].tolist() for r in results], type=pa.list_(pa.float32()))
    return pa.table(columns), _weight_stats(rows, results, unit)


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
    _check_scorers(unit, pos, neg, ref, spec.contrast)
    chunks = row_chunks(rows, ref.role, batch_size)
    scores = {}
    for x in (ref, pos, neg):
        if x is not None and (id(x.model), x.role) not in scores:
            scores[(id(x.model), x.role)] = score_chunks(x, rows, chunks, unit, device)
    pair = (scores[(id(pos.model), pos.role)], scores[(id(neg.model), neg.role)]) if pos is not None else None
    return assemble_signals(rows, chunks, unit, scores[(id(ref.model), ref.role)], pair, spec)


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


@dataclass(frozen=True)
class ScoringModels:
    """The models of a signals job and whose ids each scores: ``ref`` always, ``pos`` and ``neg`` together or
    neither (then the weights are uniform or random)."""

    reference: str
    pos: str | None = None
    neg: str | None = None
    roles: tuple = ()  # (("ref", role), ("pos", role), ("neg", role))
    dtype: str = "float32"

    def named(self) -> list[tuple[str, str, str]]:
        """(name, model dir, role) of every model the job uses."""
        roles = dict(self.roles)
        paths = (("ref", self.reference), ("pos", self.pos), ("neg", self.neg))
        return [(name, path, roles[name]) for name, path in paths if path]


def _shard_settings(unit: str, models: ScoringModels, spec: WeightSpec, batch_size: int) -> dict:
    return dict(unit=unit, roles=dict(models.roles), spec=asdict(spec), batch_size=batch_size)


def _shard_inputs(tokens: Path, models: ScoringModels) -> dict:
    configs = {f"{name}_model_config": Path(path) / "config.json" for name, path, _ in models.named()}
    return {"tokens": tokens, **{k: v for k, v in configs.items() if v.is_file()}}


def _stash_key(pairs: list[tuple[Path, Path]], unit: str, models: ScoringModels, spec, batch_size: int) -> str:
    """What a finished shard of an earlier try must share with this job to be reused: the settings, the
    models (their files as they are now) and the token shards."""
    parts = {
        "settings": _shard_settings(unit, models, spec, batch_size),
        "dtype": models.dtype,
        "models": {name: path_identity(path) for name, path, _ in models.named()},
        "tokens": {str(out): path_identity(tokens) for tokens, out in pairs},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _write_signals(
    table: pa.Table, stats: dict, tokens: Path, out: Path, unit, models: ScoringModels, spec, batch_size
):
    roles = dict(models.roles)
    meta = {
        b"prefkd.unit": unit.encode(),
        b"prefkd.role": roles["ref"].encode(),
        b"prefkd.roles": json.dumps(roles, sort_keys=True).encode(),
        b"prefkd.spec": json.dumps(asdict(spec), sort_keys=True).encode(),
    }
    if spec.aggregation == "mean" and unit == "span":
        meta[b"prefkd.folded"] = f"{POLICY_ROLE} token counts".encode()
    table = table.replace_schema_metadata(meta)
    check_finite(table, out)
    stats.update(unit=unit, role=roles["ref"], roles=roles, spec=asdict(spec))
    provenance = make_provenance(out, _shard_settings(unit, models, spec, batch_size), _shard_inputs(tokens, models))
    write_shard(table, out, kind="signals", stats=stats, provenance=provenance)


def _score_all(todo: dict, unit: str, models: ScoringModels, batch_size: int, seed: int, device: str) -> dict:
    """Every (model dir, role)'s chunk scores of every shard in ``todo`` ({out: rows}), loading each model once
    and holding one model at a time; -> {out: {(path, role): scores}} and the chunks per shard."""
    ref_role = dict(models.roles)["ref"]
    chunks = {out: row_chunks(rows, ref_role, batch_size) for out, rows in todo.items()}
    scores: dict = {out: {} for out in todo}
    for path in dict.fromkeys(str(p) for _, p, _ in models.named()):
        model = load_model(path, dtype=models.dtype).to(device).eval()
        pad = pad_id(load_tokenizer(path))
        for role in dict.fromkeys(r for _, p, r in models.named() if str(p) == path):
            torch.manual_seed(seed)
            for out, rows in todo.items():
                scores[out][(path, role)] = score_chunks(Scorer(model, role, pad), rows, chunks[out], unit, device)
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return scores, chunks


def run_shards(
    pairs: list[tuple[Path, Path]],
    unit: str,
    models: ScoringModels,
    spec: WeightSpec,
    batch_size: int = 8,
    device: str = "auto",
) -> list[dict]:
    """Signal shards ``out`` of token shards ``tokens`` for every (tokens, out) pair, each model loaded once.

    Shards finished by an earlier try of the same job (same settings, models and tokens) are restored from the
    stash instead of recomputed; the statistics of the shards computed now are returned."""
    roles = dict(models.roles)
    named = {name: Scorer(None, role, 0) for name, _, role in models.named()}
    _check_scorers(unit, named.get("pos"), named.get("neg"), named["ref"], spec.contrast)
    device = pick_device(device)
    stash = ShardStash(_stash_key(pairs, unit, models, spec, batch_size))
    todo = {out: read_shard(tokens, "tokens").to_pylist() for tokens, out in pairs if not stash.restore(out)}
    scores, chunks = _score_all(todo, unit, models, batch_size, spec.seed, device)
    key = {name: (str(path), roles[name]) for name, path, _ in models.named()}
    stats = []
    for tokens, out in pairs:
        if out not in todo:
            continue
        own = scores[out]
        pair = (own[key["pos"]], own[key["neg"]]) if "pos" in key else None
        table, shard_stats_ = assemble_signals(todo[out], chunks[out], unit, own[key["ref"]], pair, spec)
        _write_signals(table, shard_stats_, tokens, out, unit, models, spec, batch_size)
        stash.keep(out)
        stats.append(shard_stats_)
    stash.clear([out for _, out in pairs])
    return stats


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
    dtype: str = "float32",
) -> dict:
    """One signal shard. ``role`` scores every model unless ``roles`` ({"ref"|"pos"|"neg": role}) says otherwise."""
    roles = {"ref": role, "pos": role, "neg": role, **(roles or {})}
    models = ScoringModels(reference, pos, neg, tuple(sorted(roles.items())), dtype)
    return run_shards([(Path(tokens), Path(out))], unit, models, spec, batch_size)[0]


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
    pairs = paired_shards(s.tokens, s.out, "--tokens")
    roles = {"ref": s.role, "pos": s.role, "neg": s.role, **s.roles()}
    models = ScoringModels(s.reference, s.pos, s.neg, tuple(sorted(roles.items())), s.dtype)
    stats = run_shards(pairs, s.unit, models, s.spec(), s.batch_size)
    print(json.dumps({"shards": len(pairs), "computed": len(stats), "pairs": sum(x["pairs"] for x in stats)}))
    return 0


def run_gather(s: WeightsStatsSettings) -> int:
    groups = group_items(s.shards, "SET")
    report = {name: merge_weight_stats([shard_stats(p) for p in paths]) for name, paths in groups.items()}
    write_json(Path(s.out), report)
    print(json.dumps({name: r.get("planted_check", {}) for name, r in report.items()}))
    return 0
