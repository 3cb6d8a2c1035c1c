#!/usr/bin/env python
"""Benchmark of the tokenize+align stage: prints ONE JSON line.

Usage::

    python benchmarks/alignment.py [--quick] [--pairs N] [--repeats R]
                                   [--max-length L] [--max-prompt-length P]
                                   [--tokenizers-parallelism true|false]

Data: ``prefkd.data.demo.generate_demo_pairs(N, seed)`` (``pair_id`` added as the
row index, as ``prefkd prepare`` does), tokenized by the real demo tokenizers:
teacher = ``builtin:mistral-v0.3`` (SentencePiece, byte fallback), student =
``builtin:qwen2.5`` (byte-level BPE). Both are built once with
``prefkd.assets.tokenizers.build_builtin`` from the wheels in ``.cache/wheels`` and
cached under ``.cache/bench-tokenizers/<hash>/{teacher,student}``; the hash
covers ``prefkd/assets/tokenizers.py``, ``prefkd/assets/templates/*`` and the
transformers/tokenizers versions, so a change to any of them rebuilds.

The two ratios are both measured in the same process, on the same data. Each
side is warmed up once, then timed ``--repeats`` times with
``time.perf_counter``, the order alternating A,B / B,A between repeats, with
``gc.collect()`` before every timed sample. A call shorter than 50 ms (at the
warm-up) is repeated back to back inside one sample and the per-call time is
taken. Headline ratios use the MEDIAN of the samples; ``*_min`` variants use
the minimum; ``*_paired`` is the median of the per-repeat ratios of the two
adjacent samples (the most robust on a busy machine).

``alignment_speedup`` = time(align_reference) / time(align)
    Both compute the common-cut spans of the same rows: every chosen and every
    rejected response (rows whose token bytes round-trip the text and that have
    at least one token per side; in practice all of them). Input of both: the
    byte start of every teacher token and every student token in the response's
    UTF-8 bytes (from ``prefkd.core.align.token_starts``) and the response byte
    lengths. ``align`` gets them as CSR numpy arrays (its native format),
    ``align_reference`` as Python lists of lists (its native format); the
    conversion between the two is done once, outside the timing. Before any
    ratio is reported the outputs are asserted equal row by row: the teacher
    span id of every token, the student span id of every token, and the span
    end offsets. Target: >= 30.

``stage_over_floor`` = time(tokenize_pairs) / time(floor)
    Stage: ``prefkd.data.tokenize_align.tokenize_pairs(records, teacher, student,
    max_length, max_prompt_length)`` -- the whole stage in memory: chat-template
    rendering, prompt tokenization and truncation, response tokenization, byte
    round-trip checks, alignment, span-prefix truncation, EOS, and the Arrow
    table (not written to disk). ``ModelTokens`` (incl. ``ByteVocab``) is built
    once, outside the timing.
    Floor: the plain Hugging Face ``__call__`` API of both tokenizers, one batch
    call per text list, ``tok(texts, add_special_tokens=False)``, on the same
    texts the stage tokenizes: the rendered chat-template prompts (rendered
    once, outside the timing, so rendering counts against the stage only), the
    chosen responses and the rejected responses -- 6 calls in all.
    Target: <= 1.5.

``TOKENIZERS_PARALLELISM`` is set before ``tokenizers`` is imported (to the
value of ``--tokenizers-parallelism``, default: the environment's value, else
``false`` as in the workflow's tokenize rule) and so applies to both sides of
both comparisons; it is reported in the output, with the CPU count.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
WHEEL_DIR = Path(os.environ.get("PREFKD_WHEEL_DIR", REPO_ROOT / ".cache" / "wheels"))
CACHE_DIR = REPO_ROOT / ".cache" / "bench-tokenizers"

ALIGNMENT_TARGET = 30.0
STAGE_TARGET = 1.5


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="small run (default 1000 pairs, 5 repeats), well under 60 s")
    p.add_argument("--pairs", type=int, default=None, help="demo pairs (default 3000, 1000 with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="timed samples per side (default 7, 5 with --quick)")
    p.add_argument("--seed", type=int, default=1, help="demo data seed (default 1)")
    p.add_argument("--max-length", type=int, default=256, help="as config.yaml (default 256)")
    p.add_argument("--max-prompt-length", type=int, default=128, help="as config.yaml (default 128)")
    p.add_argument(
        "--tokenizers-parallelism",
        choices=("true", "false"),
        default=os.environ.get("TOKENIZERS_PARALLELISM", "false").lower(),
        help="TOKENIZERS_PARALLELISM for both sides (default: the environment's value, else false)",
    )
    args = p.parse_args(argv)
    if args.pairs is None:
        args.pairs = 1000 if args.quick else 3000
    if args.repeats is None:
        args.repeats = 5 if args.quick else 7
    if args.pairs < 1 or args.repeats < 1:
        p.error("--pairs and --repeats must be at least 1")
    return args


# ---------------------------------------------------------------------------
# Tokenizers (built once, cached)
# ---------------------------------------------------------------------------


def tokenizer_dirs() -> tuple[dict[str, Path], bool]:
    """{role: dir}, building missing ones atomically. Returns (dirs, built_any)."""
    from prefkd.assets.tokenizers import cached_demo_tokenizers

    dirs, built = cached_demo_tokenizers(CACHE_DIR, WHEEL_DIR)
    root = next(iter(dirs.values())).parent
    if built:  # drop builds for other hashes not touched for an hour
        for old in CACHE_DIR.iterdir():
            if old.is_dir() and old != root and time.time() - old.stat().st_mtime > 3600:
                shutil.rmtree(old, ignore_errors=True)
    return dirs, built


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


def _timed(fn, number: int) -> float:
    """Seconds per call of ``fn``, averaged over ``number`` back-to-back calls."""
    gc.collect()
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def compare(fn_a, fn_b, repeats: int, min_sample_s: float = 0.05) -> tuple[list[float], list[float], int, int]:
    """Warm both up once, then time them interleaved (A,B then B,A, ...).

    A call shorter than ``min_sample_s`` (measured at the warm-up) is repeated back to back
    inside one sample so that timer and scheduler noise stay small; the times returned are
    per call. Returns (times_a, times_b, calls per sample of a, of b).
    """
    number = []
    for fn in (fn_a, fn_b):
        t0 = time.perf_counter()
        fn()
        number.append(max(1, math.ceil(min_sample_s / max(time.perf_counter() - t0, 1e-9))))
    times_a, times_b = [], []
    for i in range(repeats):
        if i % 2 == 0:
            times_a.append(_timed(fn_a, number[0]))
            times_b.append(_timed(fn_b, number[1]))
        else:
            times_b.append(_timed(fn_b, number[1]))
            times_a.append(_timed(fn_a, number[0]))
    return times_a, times_b, number[0], number[1]


def _summary(times: list[float], number: int) -> dict:
    return {
        "calls_per_sample": number,
        "median_s": round(statistics.median(times), 6),
        "min_s": round(min(times), 6),
        "all_s": [round(t, 6) for t in times],
    }


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


def alignment_inputs(records, teacher, student):
    """Token byte starts of both sides for every chosen and rejected response (rows that can be aligned)."""
    import numpy as np

    from prefkd.core import align as A
    from prefkd.data.tokenize_align import _utf8

    texts = [r[side] for side in ("chosen", "rejected") for r in records]
    text, text_splits = _utf8(texts)
    n_bytes = np.diff(text_splits)
    keep = np.ones(len(texts), dtype=bool)
    per_model = {}
    for role, model in (("teacher", teacher), ("student", student)):
        ids, splits = model.encode(texts)
        starts, ok = A.token_starts(model.vocab, ids, splits, text, text_splits)
        keep &= ok & (np.diff(splits) > 0)
        per_model[role] = (starts, splits)
    sel = {}
    for role, (starts, splits) in per_model.items():
        mask = keep[A.row_index(splits)]
        sel[role] = (starts[mask].astype(np.int64), A.splits_from_lengths(np.diff(splits)[keep]))
    n_bytes = n_bytes[keep].astype(np.int64)
    vec = (sel["teacher"][0], sel["teacher"][1], sel["student"][0], sel["student"][1], n_bytes)

    def rows(values, splits):
        flat = values.tolist()
        bounds = splits.tolist()
        return [flat[bounds[r] : bounds[r + 1]] for r in range(len(bounds) - 1)]

    ref = (rows(*sel["teacher"]), rows(*sel["student"]), n_bytes.tolist())
    return vec, ref, int(len(texts)), int(keep.sum())


def alignment_as_lists(al, t_splits, s_splits):
    def rows(values, splits):
        flat = values.tolist()
        bounds = splits.tolist()
        return [flat[bounds[r] : bounds[r + 1]] for r in range(len(bounds) - 1)]

    return rows(al.teacher_span, t_splits), rows(al.student_span, s_splits), rows(al.span_ends, al.span_splits)


def check_equal(vectorised, reference) -> None:
    names = ("teacher span ids", "student span ids", "span ends")
    for name, got, want in zip(names, vectorised, reference):
        if len(got) != len(want):
            raise AssertionError(f"{name}: {len(got)} rows from align, {len(want)} from align_reference")
        for r, (g, w) in enumerate(zip(got, want)):
            if g != w:
                raise AssertionError(f"{name} differ in row {r}: align={g} align_reference={w}")


def floor_inputs(records, teacher_tok, student_tok) -> list[tuple[object, list[str]]]:
    calls = []
    for tok in (teacher_tok, student_tok):
        rendered = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in records]
        calls.append((tok, rendered))
        calls.append((tok, [r["chosen"] for r in records]))
        calls.append((tok, [r["rejected"] for r in records]))
    return calls


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def main(argv=None) -> int:
    t_start = time.perf_counter()
    args = parse_args(argv)
    os.environ["TOKENIZERS_PARALLELISM"] = args.tokenizers_parallelism
    sys.path.insert(0, str(REPO_ROOT))

    import numpy as np  # noqa: F401 - imported before timing
    import tokenizers
    import transformers

    from prefkd.assets.tokenizers import load_tokenizer
    from prefkd.core.align import align, align_reference
    from prefkd.data.demo import generate_demo_pairs
    from prefkd.data.tokenize_align import ModelTokens, tokenize_pairs

    t0 = time.perf_counter()
    dirs, built = tokenizer_dirs()
    toks = {role: load_tokenizer(d) for role, d in dirs.items()}
    setup_tokenizers_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    teacher, student = ModelTokens(toks["teacher"]), ModelTokens(toks["student"])
    setup_model_tokens_s = time.perf_counter() - t0

    records = [{"pair_id": i, **pair} for i, pair in enumerate(generate_demo_pairs(args.pairs, args.seed))]

    # 1. span alignment: vectorised vs per-token Python, same inputs, outputs asserted equal.
    vec_in, ref_in, rows_in, rows_aligned = alignment_inputs(records, teacher, student)
    t_splits, s_splits = vec_in[1], vec_in[3]
    check_equal(alignment_as_lists(align(*vec_in), t_splits, s_splits), align_reference(*ref_in))
    t_vec, t_ref, n_vec, n_ref = compare(lambda: align(*vec_in), lambda: align_reference(*ref_in), args.repeats)

    # 2. whole stage vs raw HF tokenizer calls on the same texts.
    calls = floor_inputs(records, toks["teacher"], toks["student"])

    def stage():
        return tokenize_pairs(records, teacher, student, args.max_length, args.max_prompt_length)

    def floor():
        for tok, texts in calls:
            tok(texts, add_special_tokens=False)

    table, stats = stage()
    t_stage, t_floor, n_stage, n_floor = compare(stage, floor, args.repeats)

    med = statistics.median
    alignment_speedup = med(t_ref) / med(t_vec)
    stage_over_floor = med(t_stage) / med(t_floor)
    n_tokens = int(len(vec_in[0]) + len(vec_in[2]))
    try:
        cpus_usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus_usable = os.cpu_count()
    result = {
        "alignment_speedup": round(alignment_speedup, 2),
        "stage_over_floor": round(stage_over_floor, 3),
        "alignment_speedup_min": round(min(t_ref) / min(t_vec), 2),
        "stage_over_floor_min": round(min(t_stage) / min(t_floor), 3),
        "alignment_speedup_paired": round(med([r / v for r, v in zip(t_ref, t_vec)]), 2),
        "stage_over_floor_paired": round(med([s / f for s, f in zip(t_stage, t_floor)]), 3),
        "targets": {
            "alignment_speedup_min_target": ALIGNMENT_TARGET,
            "stage_over_floor_max_target": STAGE_TARGET,
            "alignment_ok": alignment_speedup >= ALIGNMENT_TARGET,
            "stage_ok": stage_over_floor <= STAGE_TARGET,
        },
        "pairs": args.pairs,
        "repeats": args.repeats,
        "quick": args.quick,
        "max_length": args.max_length,
        "max_prompt_length": args.max_prompt_length,
        "alignment": {
            "rows": rows_aligned,
            "rows_skipped": rows_in - rows_aligned,
            "tokens": n_tokens,
            "outputs_equal": True,
            "align": _summary(t_vec, n_vec),
            "align_reference": _summary(t_ref, n_ref),
            "align_rows_per_s": round(rows_aligned / med(t_vec)),
            "align_reference_rows_per_s": round(rows_aligned / med(t_ref)),
        },
        "stage": {
            "pairs_out": stats["pairs_out"],
            "drops": stats["drops"],
            "prompts_truncated": stats["prompts_truncated"],
            "responses_truncated": stats["responses_truncated"],
            "tokenize_pairs": _summary(t_stage, n_stage),
            "floor_hf_call": _summary(t_floor, n_floor),
            "stage_pairs_per_s": round(args.pairs / med(t_stage)),
            "floor_pairs_per_s": round(args.pairs / med(t_floor)),
            "floor_calls": len(calls),
        },
        "setup": {
            "tokenizers_built": built,
            "tokenizers_s": round(setup_tokenizers_s, 3),
            "model_tokens_s": round(setup_model_tokens_s, 3),
            "cache_dir": str(dirs["teacher"].parent.relative_to(REPO_ROOT)),
        },
        "env": {
            "tokenizers_parallelism": os.environ["TOKENIZERS_PARALLELISM"],
            "cpu_count": os.cpu_count(),
            "cpus_usable": cpus_usable,
            "torch_imported": "torch" in sys.modules,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "tokenizers": tokenizers.__version__,
            "transformers": transformers.__version__,
        },
        "wall_s": round(time.perf_counter() - t_start, 2),
    }
    print(json.dumps(result, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
