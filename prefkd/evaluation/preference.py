"""Held-out preference metrics of one model: implicit-reward accuracy and margin.

The implicit reward of a response is ``beta * sum_t (log pi(y_t) - log pi_ref(y_t))`` over its
tokens, with the reference log-probs precomputed by the ``dpo_reference`` stage (the role's SFT
model). ``accuracy`` is the share of pairs whose chosen reward beats the rejected one, ties
counting one half, so the reference itself scores 0.5 with margin 0. A tie is a log-ratio margin
within ``TIE_NATS`` of zero: the reference log-probs were computed in another job (other batch
shapes, float32 storage), so the reference model evaluated against them differs by float noise. ``logp_accuracy``
needs no reference: the share of pairs where the model gives the chosen response the higher
summed log-probability (ties one half).

Both are means of per-pair outcomes (1 win, 0.5 tie, 0 loss), which ``per_pair`` keeps (pair_id, margin,
outcome, logp_outcome) so the report can give intervals and paired tests; ``accuracy_ci`` and
``logp_accuracy_ci`` are the 95% percentile bootstrap intervals of ``prefkd.evaluation.stats``.
"""

from __future__ import annotations

import json

import torch

from prefkd.assets.models import load_model, pick_device
from prefkd.assets.tokenizers import load_tokenizer, pad_id
from prefkd.core.logprobs import model_token_logps, span_logps
from prefkd.data.batches import PairTable, collate_pairs
from prefkd.errors import PrefkdError
from prefkd.evaluation.settings import PreferenceEvalSettings
from prefkd.evaluation.stats import bootstrap_ci
from prefkd.io.files import write_json

TIE_NATS = 1e-3


def _outcomes(better, tie) -> list[float]:
    return [0.5 if t else 1.0 if b else 0.0 for b, t in zip(better.tolist(), tie.tolist())]


def preference_summary(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, pair_ids=None) -> dict:
    """Pure: per-pair summed log-probs (policy and reference) -> accuracy, margin, ties, logp accuracy,
    their per-pair outcomes (``pair_ids`` default 0..n-1) and bootstrap intervals."""
    pc, pr = torch.as_tensor(policy_chosen, dtype=torch.float64), torch.as_tensor(policy_rejected, dtype=torch.float64)
    rc, rr = torch.as_tensor(ref_chosen, dtype=torch.float64), torch.as_tensor(ref_rejected, dtype=torch.float64)
    n = int(pc.numel())
    if n == 0:
        raise PrefkdError("no held-out pairs to evaluate; the test split is empty.")
    ids = list(range(n)) if pair_ids is None else [int(i) for i in pair_ids]
    if len(ids) != n:
        raise PrefkdError(f"{len(ids)} pair ids for {n} pairs; give one id per pair.")
    log_ratio = (pc - rc) - (pr - rr)
    tie = log_ratio.abs() <= TIE_NATS
    logp_tie = (pc - pr).abs() <= TIE_NATS
    outcome, logp_outcome = _outcomes(log_ratio > 0, tie), _outcomes(pc > pr, logp_tie)
    margins = (beta * log_ratio).tolist()
    return {
        "accuracy": (int(((log_ratio > 0) & ~tie).sum()) + 0.5 * int(tie.sum())) / n,
        "margin": float((beta * log_ratio).mean()),
        "ties": int(tie.sum()),
        "logp_accuracy": (int(((pc > pr) & ~logp_tie).sum()) + 0.5 * int(logp_tie.sum())) / n,
        "pairs": n,
        "beta": beta,
        "accuracy_ci": list(bootstrap_ci(outcome)),
        "logp_accuracy_ci": list(bootstrap_ci(logp_outcome)),
        "per_pair": [
            {"pair_id": i, "margin": m, "outcome": o, "logp_outcome": lo}
            for i, m, o, lo in zip(ids, margins, outcome, logp_outcome)
        ],
    }


@torch.no_grad()
def response_logps(model, table, role: str, pad_id: int, batch_size: int = 8, device: str = "cpu"):
    """Per pair: summed response log-probs of the model and of the reference (signal shards).

    Returns four float64 tensors [N]: policy chosen/rejected, reference chosen/rejected.
    """

    model.eval()
    out = [[], [], [], []]
    for start in range(0, len(table), batch_size):
        rows = table.rows(range(start, min(start + batch_size, len(table))))
        b = collate_pairs(rows, role, "token", pad_id, with_signals=True)
        b = {k: v.to(device) for k, v in b.items()}
        lp = model_token_logps(model, b["input_ids"], b["attention_mask"], needed=b["unit_ids"] >= 0)
        units = span_logps(lp, b["unit_ids"], b["unit_mask"].shape[1]).double()
        mask, ref = b["unit_mask"].double(), b["ref_logps"].double()
        policy = (units * mask).sum(-1).cpu()
        reference = (ref * mask).sum(-1).cpu()
        for i, t in enumerate((*policy.chunk(2), *reference.chunk(2))):
            out[i].append(t)
    return [torch.cat(x) if x else torch.zeros(0, dtype=torch.float64) for x in out]


def evaluate_preference(
    model_dir, role: str, tokens, ref_signals, beta: float, batch_size: int = 8, device: str = "auto"
) -> dict:
    """Preference metrics of the model in ``model_dir`` on the held-out token shards."""

    table = PairTable(tokens, ref_signals)
    if table.signal_unit and table.signal_unit != "token":
        raise PrefkdError(
            f"reference signals must be in token units, not {table.signal_unit!r} (use the dpo-ref-{role} shards)."
        )
    device = pick_device(device)
    model = load_model(str(model_dir)).to(device)
    pc, pr, rc, rr = response_logps(model, table, role, pad_id(load_tokenizer(model_dir)), batch_size, device)
    return preference_summary(pc, pr, rc, rr, beta, pair_ids=table.pair_ids)


def run(s: PreferenceEvalSettings) -> int:
    result = evaluate_preference(s.model, s.role, s.tokens, s.ref_signals, s.beta, s.batch_size, s.device)
    result = {"model": s.name, "reference": s.reference_name, **result}
    write_json(s.out, result)
    print(json.dumps({k: result[k] for k in ("model", "accuracy", "margin", "pairs")}))
    return 0
