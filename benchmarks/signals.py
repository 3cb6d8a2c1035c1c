"""Signals stage vs plain no-grad forward passes of the same models over the same batches.

    python benchmarks/signals.py [--quick] [--pairs N] [--repeats R]

Prints one JSON line with ``signals_over_forward`` = time of
``prefkd.training.signals.compute_signals`` (contrastive pair pi+ / pi-, reference = pi+ so
two models are run, CTPD weights over aligned spans, per-span scatter, the weight
transform and the Arrow table) divided by the time of plain
``model(input_ids, attention_mask).logits`` calls of the same two models, under
``torch.no_grad()``, on exactly the batches the stage builds (same rows, order and
padding). Target: <= 1.15.

The models are Mistral-architecture with the real Mistral-7B-v0.3 vocabulary
(32768) and a transformer body of hidden size 256 (2 layers): large enough that,
as in real LLMs, the body and not the vocabulary projection sets the cost. (With
the demo's hidden size 64 the log-softmax that any log-prob needs costs about as
much as the whole forward; see ``--hidden 64``.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small run (< 60 s)")
    ap.add_argument("--pairs", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    pairs = args.pairs or (32 if args.quick else 200)
    repeats = args.repeats or (5 if args.quick else 7)

    import torch

    from prefkd.assets.models import tiny_config
    from prefkd.assets.tokenizers import build_builtin, default_wheel_dir, load_tokenizer
    from prefkd.data.batches import collate_pairs
    from prefkd.data.demo import generate_demo_pairs
    from prefkd.data.tokenize_align import ModelTokens, tokenize_pairs
    from prefkd.training.signals import Scorer, WeightSpec, compute_signals

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    cache = ROOT / ".cache" / "bench-tokenizers" / "signals"
    for name, role in (("mistral-v0.3", "teacher"), ("qwen2.5", "student")):
        if not (cache / role / "tokenizer.json").exists():
            build_builtin(name, cache / role, default_wheel_dir())
    teacher_tok = load_tokenizer(cache / "teacher")
    records = [dict(pair_id=i, **p) for i, p in enumerate(generate_demo_pairs(pairs, seed=1))]
    table, _ = tokenize_pairs(
        records, ModelTokens(teacher_tok), ModelTokens(load_tokenizer(cache / "student")), 256, 128
    )
    rows = table.to_pylist()

    from transformers import MistralForCausalLM

    def model(seed):
        cfg = tiny_config("mistral", teacher_tok, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                          num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4)  # fmt: skip
        torch.manual_seed(seed)
        return MistralForCausalLM(cfg).eval()

    pos, neg = model(1), model(2)
    pad = teacher_tok.pad_token_id
    spec = WeightSpec()

    # the batches the stage builds: rows sorted by length, then collated
    order = sorted(
        range(len(rows)),
        key=lambda i: len(rows[i]["teacher_chosen_input_ids"]) + len(rows[i]["teacher_rejected_input_ids"]),
    )
    batches = [
        collate_pairs([rows[i] for i in order[s : s + args.batch_size]], "teacher", "span", pad)
        for s in range(0, len(order), args.batch_size)
    ]

    pos_s, neg_s = Scorer(pos, "teacher", pad), Scorer(neg, "teacher", pad)

    def stage():
        compute_signals(rows, "span", pos_s, neg_s, pos_s, spec, batch_size=args.batch_size)

    @torch.no_grad()
    def floor():
        for b in batches:
            for m in (pos, neg):
                _ = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits

    stage(), floor()  # warm-up
    t_stage, t_floor = [], []
    for r in range(repeats):
        for _name, fn, out in (("stage", stage, t_stage), ("floor", floor, t_floor))[:: 1 if r % 2 == 0 else -1]:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    # min over interleaved repeats: the least disturbed sample of each (the machine is shared)
    ratio = min(t_stage) / min(t_floor)
    print(json.dumps({
        "signals_over_forward": round(ratio, 3),
        "signals_over_forward_median": round(statistics.median(t_stage) / statistics.median(t_floor), 3),
        "target": 1.15,
        "ok": ratio <= 1.15,
        "pairs": len(rows),
        "batches": len(batches),
        "models_per_batch": 2,
        "hidden": args.hidden,
        "vocab": len(teacher_tok),
        "stage_s": [round(t, 3) for t in t_stage],
        "floor_s": [round(t, 3) for t in t_floor],
        "threads": torch.get_num_threads(),
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
