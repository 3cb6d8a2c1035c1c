"""Stage tokenize+align: both tokenizations of every pair, with shared spans, to Arrow shards.

Per pair and per model: the prompt is rendered with the model's chat template
(generation prompt on) and tokenized; each response is tokenized on its own
and mapped to UTF-8 byte positions; the two models' spans are aligned on the
response bytes; responses are cut at the largest common span prefix that fits
both models' budgets (so both always cover the same text); EOS is appended to
responses that were not cut.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prefkd.assets.tokenizers import load_tokenizer
from prefkd.core import align as A
from prefkd.core.settings import setting
from prefkd.data.span_classes import SPAN_CLASSES, class_shares, span_class_counts
from prefkd.errors import PrefkdError
from prefkd.io.files import group_items, write_json
from prefkd.io.shards import ROLES, SIDES, TOKEN_OPTIONAL, make_provenance, read_shard, shard_stats, write_shard

SPAN_SIZE_BUCKETS = 8  # histogram buckets 1..8 tokens, then "9+"


class ModelTokens:
    """One model's tokenizer with what the stage needs from it, computed once."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.backend = tokenizer.backend_tokenizer
        self.vocab = A.ByteVocab.from_tokenizer(tokenizer)
        self.eos_id = tokenizer.eos_token_id
        self.bos_id = tokenizer.bos_token_id
        if self.eos_id is None:
            raise PrefkdError(
                f"tokenizer {tokenizer.name_or_path!r} has no eos_token; set one in its tokenizer_config.json."
            )

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of each text (no special tokens added) as a ragged (values, splits) pair."""
        encodings = (
            self.backend.encode_batch_fast(texts, add_special_tokens=False)
            if hasattr(self.backend, "encode_batch_fast")
            else self.backend.encode_batch(texts, add_special_tokens=False)
        )
        lists = [e.ids for e in encodings]
        lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
        values = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int32, count=int(lengths.sum()))
        return values, A.splits_from_lengths(lengths)

    def prompt_ids(self, prompts: list[list[dict]], max_prompt_length: int):
        """Chat-templated prompt ids, left-truncated to ``max_prompt_length`` (BOS kept).

        Returns (values, splits, number truncated, per-row bool: the template refused the prompt)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise PrefkdError(
                f"tokenizer {self.tokenizer.name_or_path!r} has no chat template; set the model's chat_template option."
            )
        rendered, failed = [], np.zeros(len(prompts), dtype=bool)
        for i, p in enumerate(prompts):
            try:
                rendered.append(self.tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False))
            except Exception:  # jinja's TemplateError and friends: a row the template rejects
                rendered.append("")
                failed[i] = True
        values, splits = self.encode(rendered)
        lengths = np.diff(splits)
        over = lengths > max_prompt_length
        if over.any():
            rows = []
            for r in range(len(prompts)):
                ids = values[splits[r] : splits[r + 1]]
                if over[r]:
                    if self.bos_id is not None and len(ids) and ids[0] == self.bos_id:
                        ids = np.concatenate([ids[:1], ids[len(ids) - (max_prompt_length - 1) :]])
                    else:
                        ids = ids[len(ids) - max_prompt_length :]
                rows.append(ids)
            lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
            values = np.concatenate(rows).astype(np.int32) if rows else values
            splits = A.splits_from_lengths(lengths)
        return values, splits, int(over.sum()), failed


def _utf8(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    blobs = [t.encode("utf-8") for t in texts]
    lengths = np.fromiter(map(len, blobs), dtype=np.int64, count=len(blobs))
    return np.frombuffer(b"".join(blobs), dtype=np.uint8), A.splits_from_lengths(lengths)


def _select(values: np.ndarray, splits: np.ndarray, rows: np.ndarray):
    """Keep the rows whose mask is True."""
    mask = rows[A.row_index(splits)]
    return values[mask], A.splits_from_lengths(np.diff(splits)[rows])


def _list_array(values: np.ndarray, splits: np.ndarray) -> pa.Array:
    return pa.ListArray.from_arrays(
        pa.array(splits.astype(np.int32)), pa.array(values.astype(np.int32), type=pa.int32())
    )


def _encode_prompts(records, models, max_prompt_length, keep, drops, stats) -> dict:
    """{role: (ids, splits)} of every prompt (chat template, cut to max_prompt_length keeping its end);
    rows whose prompt a template refuses are dropped from ``keep``."""
    prompts = {}
    stats["prompts_truncated"] = {}
    for role, model in models.items():
        values, splits, n_cut, refused = model.prompt_ids([r["prompt"] for r in records], max_prompt_length)
        prompts[role] = (values, splits)
        stats["prompts_truncated"][role] = n_cut
        # e.g. two assistant turns in a row, which strict templates (Mistral's) refuse
        drops[f"{role}_chat_template_rejects_prompt"] += int((refused & keep).sum())
        keep &= ~refused
    return prompts


def _encode_responses(records, models, keep, drops) -> dict:
    """Per side: ({role: (ids, splits)}, {role: token byte starts}, response byte lengths); rows whose tokens
    do not spell the text exactly, or that tokenize to nothing, are dropped from ``keep``."""
    per_side = {}
    for side in SIDES:
        text, text_splits = _utf8([r[side] for r in records])
        n_bytes = np.diff(text_splits)
        tokens, starts = {}, {}
        for role, model in models.items():
            ids, splits = model.encode([r[side] for r in records])
            st, ok = A.token_starts(model.vocab, ids, splits, text, text_splits)
            bad = ~ok & keep
            drops[f"{role}_bytes_mismatch"] += int(bad.sum())
            keep &= ok
            tokens[role], starts[role] = (ids, splits), st
        empty = (np.diff(tokens["teacher"][1]) == 0) | (np.diff(tokens["student"][1]) == 0)
        drops["empty_tokenization"] += int((empty & keep).sum())
        keep &= ~empty
        per_side[side] = (tokens, starts, n_bytes)
    return per_side


def _align_kept(per_side, prompts, keep, max_length) -> dict:
    """Per side: (kept rows' {role: (ids, starts, splits)}, their alignment, how many leading spans fit)."""
    out = {}
    for side in SIDES:
        tokens, starts, n_bytes = per_side[side]
        sel = {}
        for role in ROLES:
            ids, splits = tokens[role]
            mask = keep[A.row_index(splits)]
            sel[role] = (ids[mask], starts[role][mask], A.splits_from_lengths(np.diff(splits)[keep]))
        alignment = A.align(sel["teacher"][1], sel["teacher"][2], sel["student"][1], sel["student"][2], n_bytes[keep])
        budgets = {role: max_length - np.diff(prompts[role][1])[keep] - 1 for role in ROLES}
        fit = A.spans_that_fit(alignment, sel["teacher"][2], sel["student"][2], budgets["teacher"], budgets["student"])
        out[side] = (sel, alignment, fit)
    return out


def _side_columns(side, aligned, final, prompts, models, columns, stats) -> dict:
    """Write one side's columns (every role's prompt + kept spans + EOS) into ``columns``; returns the
    tokens per kept span of each role, for the span statistics."""
    sel, alignment, fit = aligned
    num_spans = alignment.num_spans[final]
    k = fit[final]
    truncated = k < num_spans
    stats["responses_truncated"][side] = int(truncated.sum())
    span_ends, span_splits = _select(alignment.span_ends, alignment.span_splits, final)
    # keep the leading k spans of every row
    span_local = A.local_index(span_splits)
    kept_span = span_local < np.repeat(k, np.diff(span_splits))
    span_splits_kept = A.splits_from_lengths(k)
    counts = {}
    for role in ROLES:
        ids, _, splits = sel[role]
        span = alignment.teacher_span if role == "teacher" else alignment.student_span
        ids, splits2 = _select(ids, splits, final)
        span, _ = _select(span, splits, final)
        ids, span, splits2 = A.keep_leading_spans(ids, span, splits2, k)
        counts[role] = A.span_token_counts(span, splits2, span_splits_kept)
        stats["response_tokens"][role][side] = int(len(ids))
        eos_rows = ~truncated
        eos_vals = np.full(int(eos_rows.sum()), models[role].eos_id, dtype=np.int32)
        eos_splits = A.splits_from_lengths(eos_rows.astype(np.int64))
        p_vals, p_splits = prompts[role]
        input_ids, in_splits = A.concat_rows([(p_vals, p_splits), (ids, splits2), (eos_vals, eos_splits)])
        span_ids, _ = A.concat_rows(
            [
                (np.full(len(p_vals), -1, dtype=np.int32), p_splits),
                (span, splits2),
                (np.full(len(eos_vals), -1, dtype=np.int32), eos_splits),
            ]
        )
        columns[f"{role}_{side}_input_ids"] = _list_array(input_ids, in_splits)
        columns[f"{role}_{side}_span_ids"] = _list_array(span_ids, in_splits)
    columns[f"{side}_num_spans"] = pa.array(k.astype(np.int32))
    columns[f"{side}_span_bytes"] = _list_array(span_ends[kept_span], span_splits_kept)
    columns[f"{side}_truncated"] = pa.array(truncated)
    return counts


def _span_size_bucket(value: int) -> str:
    return str(int(value)) if value <= SPAN_SIZE_BUCKETS else f"{SPAN_SIZE_BUCKETS + 1}+"


def tokenize_pairs(
    records: list[dict], teacher: ModelTokens, student: ModelTokens, max_length: int, max_prompt_length: int
):
    """Tokenize and align a list of prepared pairs. Returns (pyarrow.Table, stats dict)."""
    if max_prompt_length >= max_length:
        raise PrefkdError(f"max_prompt_length ({max_prompt_length}) must be smaller than max_length ({max_length}).")
    models = {"teacher": teacher, "student": student}
    n = len(records)
    drops: Counter = Counter()
    keep = np.ones(n, dtype=bool)
    stats = {"pairs_in": n}
    prompts = _encode_prompts(records, models, max_prompt_length, keep, drops, stats)
    per_side = _encode_responses(records, models, keep, drops)
    # Align only the rows still kept (alignment needs >= 1 token per side).
    aligned = _align_kept(per_side, prompts, keep, max_length)

    # Rows where no span fits on one side are dropped: their prompt leaves no room for a response.
    kept_rows = np.flatnonzero(keep)
    no_room = np.zeros(len(kept_rows), dtype=bool)
    for side in SIDES:
        no_room |= aligned[side][2] == 0
    drops["no_room_for_response"] += int(no_room.sum())
    final = ~no_room
    final_rows = kept_rows[final]

    columns: dict[str, pa.Array] = {"pair_id": pa.array([records[i]["pair_id"] for i in final_rows], type=pa.int64())}
    for role in ROLES:
        p_vals, p_splits = _select(*prompts[role], keep)
        p_vals, p_splits = _select(p_vals, p_splits, final)
        columns[f"{role}_prompt_len"] = pa.array(np.diff(p_splits).astype(np.int32))
        prompts[role] = (p_vals, p_splits)

    span_hist, span_classes = Counter(), Counter()
    one_to_one = spans_total = 0
    stats["responses_truncated"] = {}
    stats["response_tokens"] = {role: {} for role in ROLES}
    for side in SIDES:
        counts = _side_columns(side, aligned[side], final, prompts, models, columns, stats)
        one_to_one += int(((counts["teacher"] == 1) & (counts["student"] == 1)).sum())
        spans_total += int(len(counts["teacher"]))
        span_classes.update(span_class_counts(counts["teacher"], counts["student"]))
        size = np.minimum(np.maximum(counts["teacher"], counts["student"]), SPAN_SIZE_BUCKETS + 1)
        for value, count in zip(*np.unique(size, return_counts=True)):
            span_hist[_span_size_bucket(value)] += int(count)

    for name, dtype in TOKEN_OPTIONAL.items():
        if records and name in records[0]:
            columns[name] = pa.array([records[i][name] for i in final_rows], type=dtype)

    stats.update(
        pairs_out=int(len(final_rows)),
        drops={k: v for k, v in sorted(drops.items())},
        spans=spans_total,
        one_to_one_spans=one_to_one,
        span_size_hist=dict(sorted(span_hist.items(), key=lambda kv: int(kv[0].rstrip("+")))),
        span_classes={c: int(span_classes[c]) for c in SPAN_CLASSES},
    )
    return pa.table(columns), stats


# ---------------------------------------------------------------------------
# Stage entry points
# ---------------------------------------------------------------------------


def read_prepared(path: str | Path, shard: int = 0, shards: int = 1) -> list[dict]:
    """Rows of shard ``shard`` (0-based, contiguous blocks) of a prepared split."""
    table = pq.read_table(path)
    n = table.num_rows
    lo, hi = shard * n // shards, (shard + 1) * n // shards
    return table.slice(lo, hi - lo).to_pylist()


def run_shard(
    data: Path,
    out: Path,
    teacher_dir: Path,
    student_dir: Path,
    max_length: int,
    max_prompt_length: int,
    shard: int,
    shards: int,
) -> dict:

    records = read_prepared(data, shard, shards)
    teacher = ModelTokens(load_tokenizer(teacher_dir))
    student = ModelTokens(load_tokenizer(student_dir))
    table, stats = tokenize_pairs(records, teacher, student, max_length, max_prompt_length)
    settings = dict(shard=shard, shards=shards, max_length=max_length, max_prompt_length=max_prompt_length)
    stats.update(settings)
    inputs = {
        "data": data,
        "teacher_tokenizer": Path(teacher_dir) / "tokenizer.json",
        "student_tokenizer": Path(student_dir) / "tokenizer.json",
    }
    provenance = make_provenance(out, settings, {k: v for k, v in inputs.items() if Path(v).is_file()})
    write_shard(table, out, kind="tokens", stats=stats, provenance=provenance)
    return stats


def merge_stats(parts: list[dict]) -> dict:
    """Sum shard stats into one alignment report."""
    total: dict = {"pairs_in": 0, "pairs_out": 0, "spans": 0, "one_to_one_spans": 0}
    drops, hist, classes = Counter(), Counter(), Counter()
    nested = {"prompts_truncated": Counter(), "responses_truncated": Counter()}
    tokens = {role: Counter() for role in ROLES}
    for part in parts:
        for key in total:
            total[key] += part[key]
        drops.update(part["drops"])
        hist.update(part["span_size_hist"])
        classes.update(part.get("span_classes") or {})  # shards written before span classes existed lack it
        for key in nested:
            nested[key].update(part[key])
        for role in ROLES:
            tokens[role].update(part["response_tokens"][role])
    total["one_to_one_share"] = total["one_to_one_spans"] / total["spans"] if total["spans"] else 0.0
    total["drops"] = dict(sorted(drops.items()))
    total["span_size_hist"] = dict(sorted(hist.items(), key=lambda kv: int(kv[0].rstrip("+"))))
    if classes:
        total["span_classes"] = {c: int(classes[c]) for c in SPAN_CLASSES}
        total["span_class_share"] = class_shares(total["span_classes"])
    total.update({k: dict(sorted(v.items())) for k, v in nested.items()})
    total["response_tokens"] = {role: dict(sorted(tokens[role].items())) for role in ROLES}
    total["tokens_per_span"] = {
        role: sum(tokens[role].values()) / total["spans"] if total["spans"] else 0.0 for role in ROLES
    }
    return total


def gather_stats(shards_by_split: dict[str, list[Path]], out: Path) -> dict:
    report = {}
    for split, paths in shards_by_split.items():
        report[split] = merge_stats([shard_stats(p) for p in paths])
    report["all"] = merge_stats([shard_stats(p) for paths in shards_by_split.values() for p in paths])
    write_json(out, report)
    return report


@dataclass(kw_only=True)
class TokenizeSettings:
    """Settings of ``prefkd tokenize``: one shard of one prepared split, tokenized with both tokenizers."""

    data: Path = setting(doc="prepared split (parquet) from `prefkd prepare`")
    out: Path = setting(doc="token shard to write (.arrow)")
    teacher: Path = setting(doc="teacher tokenizer dir")
    student: Path = setting(doc="student tokenizer dir")
    max_length: int = setting(512, "maximum tokens of prompt + response (+ EOS) per model")
    max_prompt_length: int = setting(128, "maximum prompt tokens per model; longer prompts keep their end")
    shard: int = setting(0, "0-based shard index")
    shards: int = setting(1, "number of shards of the split")


def run(s: TokenizeSettings) -> int:
    stats = run_shard(s.data, s.out, s.teacher, s.student, s.max_length, s.max_prompt_length, s.shard, s.shards)
    print(json.dumps({k: stats[k] for k in ("pairs_in", "pairs_out", "spans", "one_to_one_spans", "drops")}))
    return 0


@dataclass(kw_only=True)
class AlignmentStatsSettings:
    """Settings of ``prefkd alignment-stats``: merge the statistics of every token shard."""

    out: Path = setting(doc="alignment report to write (json)")
    shards: list[str] = setting(doc="SPLIT=SHARD.arrow items")


def run_gather(args: AlignmentStatsSettings) -> int:
    report = gather_stats(group_items(args.shards, "SPLIT"), args.out)
    print(
        json.dumps(
            {"pairs_out": report["all"]["pairs_out"], "one_to_one_share": round(report["all"]["one_to_one_share"], 4)}
        )
    )
    return 0


__all__ = ["ModelTokens", "tokenize_pairs", "run_shard", "merge_stats", "gather_stats", "read_shard"]
