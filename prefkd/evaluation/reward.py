"""Generation quality on held-out prompts: greedy answers, a judge's score of each, win rate vs a baseline.

* ``load_prompts``: the first ``max_prompts`` prompts of the prepared test split, in pair_id order.
* ``generate_answers``: greedy (deterministic) answers of one model dir, batched with left padding.
* Judges, each with ``score(prompts, answers) -> list[float]`` and ``accepts(prompt) -> bool``:

  - ``ImplicitJudge(pos, neg)``: the teacher pair's implicit reward of an answer,
    ``sum over answer tokens of log pi+(y_t | x, y_<t) - log pi-(y_t | x, y_<t)``.  The prompt is rendered with
    the teacher's chat template (``add_generation_prompt=True``) and the answer tokenised on its own, both
    without added special tokens and followed by EOS, exactly as the training stages build a response
    (``prefkd.data.tokenize_align``).  Only the answer tokens count, not the EOS (the training units give EOS no
    unit either).  An empty answer (or one that tokenises to nothing) scores 0.0 without running the models.
  - ``RewardModelJudge(name_or_path)``: a Hugging Face sequence-classification reward model; score = logit 0
    of ``[*prompt, {"role": "assistant", "content": answer}]`` rendered with its chat template, or of
    ``"prompt text\\n\\nanswer"`` (message contents joined by blank lines) when it has none.  Loaded from a
    local path or the Hugging Face cache only.

* ``win_rate``: per prompt, the model's score against the baseline's; ties (exact equality) count one half.
  reward.json keeps the per-prompt outcomes (``per_prompt``: pair_id, score, baseline_score, outcome 1 / 0.5 /
  0) and the 95% percentile bootstrap interval of the win rate (``win_rate_ci``, ``prefkd.evaluation.stats``).

CLI: ``prefkd generate`` (answers + scores -> generations.jsonl) and ``prefkd winrate`` (two generation
files -> reward.json), see ``GenerateSettings`` / ``WinrateSettings``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from prefkd.assets.models import _torch_dtype, load_model, pick_device
from prefkd.assets.tokenizers import load_tokenizer, pad_id
from prefkd.core.logprobs import model_token_logps
from prefkd.errors import PrefkdError
from prefkd.evaluation.settings import IMPLICIT, GenerateSettings, WinrateSettings
from prefkd.evaluation.stats import bootstrap_ci
from prefkd.io.files import write_json

# ---------------------------------------------------------------------------------------------------------
# Prompts and small helpers
# ---------------------------------------------------------------------------------------------------------


def load_prompts(data_path, max_prompts: int, seed: int = 1) -> list[dict]:
    """``[{"pair_id", "prompt"}]`` of the prepared split ``data_path``: the first ``max_prompts`` by pair_id.

    ``max_prompts`` 0 means all.  ``seed`` is accepted for a uniform signature; the choice is deterministic
    without it (the split itself was drawn with the prepare stage's seed).
    """
    import pyarrow.parquet as pq

    path = Path(data_path)
    if not path.is_file():
        raise PrefkdError(f"There is no prepared split at {path}; run the prepare stage first.")
    if max_prompts < 0:
        raise PrefkdError(f"max_prompts must be 0 (all) or positive, got {max_prompts}.")
    try:
        table = pq.read_table(path, columns=["pair_id", "prompt"])
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds of errors
        raise PrefkdError(f"Cannot read pair_id and prompt from {path} ({type(exc).__name__}: {exc}).") from exc
    rows = sorted(table.to_pylist(), key=lambda r: r["pair_id"])
    if max_prompts:
        rows = rows[:max_prompts]
    return [{"pair_id": int(r["pair_id"]), "prompt": [dict(m) for m in r["prompt"]]} for r in rows]


def render_prompt(tokenizer, prompt: list[dict]) -> str:
    """The prompt rendered with the tokenizer's chat template, ready for the assistant's answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise PrefkdError(
            f"The tokenizer {tokenizer.name_or_path!r} has no chat template, so it cannot render prompts."
        )
    try:
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # noqa: BLE001 - jinja's TemplateError and friends
        raise PrefkdError(f"The chat template of {tokenizer.name_or_path!r} refuses a prompt ({exc}).") from exc


def template_accepts(tokenizer, prompt: list[dict]) -> bool:
    """Whether the tokenizer's chat template renders ``prompt`` (strict templates refuse some turn orders)."""
    try:
        render_prompt(tokenizer, prompt)
    except PrefkdError:
        return False
    return True


def _batches(n: int, batch_size: int):
    if batch_size < 1:
        raise PrefkdError(f"batch size must be at least 1, got {batch_size}.")
    for start in range(0, n, batch_size):
        yield range(start, min(start + batch_size, n))


# ---------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------


def _generation_config(model, tokenizer, max_new_tokens: int):
    """The model's generation config made greedy, with a pad id and the tokenizer's EOS as a stop token."""
    import copy

    gen = copy.deepcopy(model.generation_config)
    gen.do_sample = False
    gen.num_beams = 1
    gen.max_new_tokens = max_new_tokens
    gen.max_length = None
    gen.pad_token_id = pad_id(tokenizer)
    stops = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    stops = [s for s in stops if s is not None]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stops:
        stops.append(tokenizer.eos_token_id)
    gen.eos_token_id = stops or None
    return gen


def generate_answers(
    model_dir,
    prompts: list[list[dict]],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    seed: int = 1,
    device: str = "auto",
    dtype: str = "float32",
) -> list[str]:
    """Greedy answers of the model in ``model_dir`` to each prompt (a list of chat messages), in order.

    Prompts are rendered with the model's chat template and batched with left padding; only the new
    tokens are decoded (special tokens skipped, whitespace stripped).
    """
    import torch

    if max_new_tokens < 1:
        raise PrefkdError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    torch.manual_seed(seed)
    device = pick_device(device)
    tokenizer = load_tokenizer(model_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = [render_prompt(tokenizer, p) for p in prompts]
    model = load_model(str(model_dir), tokenizer=tokenizer, dtype=dtype).to(device)
    gen = _generation_config(model, tokenizer, max_new_tokens)
    answers: list[str] = []
    with torch.no_grad():
        for rows in _batches(len(texts), batch_size):
            enc = tokenizer([texts[i] for i in rows], add_special_tokens=False, padding=True, return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items()}
            out = model.generate(
                input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], generation_config=gen
            )
            new = out[:, enc["input_ids"].shape[1] :].cpu()
            answers.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    return answers


# ---------------------------------------------------------------------------------------------------------
# Judges
# ---------------------------------------------------------------------------------------------------------


def answer_sequence(tokenizer, prompt: list[dict], answer: str) -> tuple[list[int], int, int]:
    """(ids of prompt + answer + EOS, index of the first answer token, number of answer tokens).

    The rendered prompt and the answer are tokenised separately without added special tokens (the
    template writes BOS itself), as the training stages do, so the answer positions are exact.
    """
    prompt_ids = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False).input_ids
    answer_ids = tokenizer(answer, add_special_tokens=False).input_ids if answer else []
    return [*prompt_ids, *answer_ids, tokenizer.eos_token_id], len(prompt_ids), len(answer_ids)


class ImplicitJudge:
    """Implicit reward of the teacher pair: summed log pi+ - log pi- over the answer tokens.

    Both models read the tokenizer of ``pos_dir``.  Models are loaded on the first ``score`` call, so the
    judge can be built (and asked which prompts its template accepts) before the generating model runs.
    """

    def __init__(self, pos_dir, neg_dir, batch_size: int = 8, device: str = "auto", dtype: str = "float32"):

        for label, path in (("positive", pos_dir), ("negative", neg_dir)):
            if path is None or not (Path(path) / "config.json").is_file():
                raise PrefkdError(f"The implicit judge needs the {label} teacher model directory; {path} is not one.")
        self.pos_dir, self.neg_dir = Path(pos_dir), Path(neg_dir)
        self.batch_size, self.device, self.dtype = batch_size, pick_device(device), dtype
        self.tokenizer = load_tokenizer(self.pos_dir)
        if self.tokenizer.eos_token_id is None:
            raise PrefkdError(
                f"The tokenizer in {self.pos_dir} has no eos token; set eos_token in its tokenizer_config.json."
            )
        self._models = None

    def accepts(self, prompt: list[dict]) -> bool:
        return template_accepts(self.tokenizer, prompt)

    def _load(self):

        if self._models is None:
            self._models = tuple(
                load_model(str(d), tokenizer=self.tokenizer, dtype=self.dtype).to(self.device).eval()
                for d in (self.pos_dir, self.neg_dir)
            )
        return self._models

    def _summed_logps(self, model, seqs: list[tuple[list[int], int, int]]):
        """Summed answer-token log-probs of each (ids, answer start, answer length), right-padded batches."""
        import torch

        pad = pad_id(self.tokenizer)
        sums = []
        for rows in _batches(len(seqs), self.batch_size):
            width = max(len(seqs[i][0]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            needed = torch.zeros((len(rows), width), dtype=torch.bool)
            for b, i in enumerate(rows):
                seq, start, length = seqs[i]
                ids[b, : len(seq)] = torch.tensor(seq)
                mask[b, : len(seq)] = 1
                needed[b, start : start + length] = True
            lp = model_token_logps(model, ids.to(self.device), mask.to(self.device), needed=needed.to(self.device))
            sums.extend((lp.double() * needed.to(self.device)).sum(-1).cpu().tolist())
        return sums

    def score(self, prompts: list[list[dict]], answers: list[str]) -> list[float]:
        import torch

        if len(prompts) != len(answers):
            raise PrefkdError(f"{len(prompts)} prompts but {len(answers)} answers to score.")
        seqs = [answer_sequence(self.tokenizer, p, a) for p, a in zip(prompts, answers)]
        live = [i for i, s in enumerate(seqs) if s[2] > 0]  # empty answers score 0.0
        scores = [0.0] * len(seqs)
        if not live:
            return scores
        pos, neg = self._load()
        with torch.no_grad():
            lp_pos = self._summed_logps(pos, [seqs[i] for i in live])
            lp_neg = self._summed_logps(neg, [seqs[i] for i in live])
        for i, a, b in zip(live, lp_pos, lp_neg):
            scores[i] = float(a - b)
        return scores


def reward_model_text(tokenizer, prompt: list[dict], answer: str) -> tuple[str, bool]:
    """(text the reward model reads, whether special tokens must be added when tokenising it)."""
    if getattr(tokenizer, "chat_template", None):
        messages = [*prompt, {"role": "assistant", "content": answer}]
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False), False
        except Exception as exc:  # noqa: BLE001 - jinja's TemplateError and friends
            raise PrefkdError(f"The reward model's chat template refuses a conversation ({exc}).") from exc
    prompt_text = "\n\n".join(m["content"] for m in prompt)
    return f"{prompt_text}\n\n{answer}", True


class RewardModelJudge:
    """A Hugging Face sequence-classification reward model; score = logit 0 of the rendered conversation.

    Loaded from a local directory or the Hugging Face Hub (only its cache when HF_HUB_OFFLINE=1); pickled
    weights only with ``allow_pickle``.  Long inputs are truncated from the left so the answer is kept.
    """

    def __init__(
        self,
        name_or_path: str,
        batch_size: int = 8,
        trust_remote_code: bool = False,
        device: str = "auto",
        dtype: str = "float32",
        allow_pickle: bool = False,
    ):
        from transformers import AutoTokenizer

        self.name = str(name_or_path)
        self.batch_size, self.device, self.dtype = batch_size, pick_device(device), dtype
        self.trust_remote_code, self.allow_pickle = trust_remote_code, allow_pickle
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.name, trust_remote_code=trust_remote_code)
        except Exception as exc:  # noqa: BLE001 - transformers / the Hub raise many kinds of errors
            raise self._error(exc) from exc
        if self.tokenizer.pad_token_id is None:
            if self.tokenizer.eos_token_id is None:
                raise PrefkdError(f"The reward model {self.name}'s tokenizer has neither a pad nor an eos token.")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"
        self._model = None

    def _error(self, exc: BaseException) -> PrefkdError:
        first = (str(exc).strip().splitlines() or ["no details"])[0].rstrip(".")
        return PrefkdError(
            f"Could not load the reward model {self.name} from a local path or the Hugging Face Hub "
            f"({type(exc).__name__}: {first}); download it first (e.g. `hf download {self.name}`)."
        )

    def accepts(self, prompt: list[dict]) -> bool:
        try:
            reward_model_text(self.tokenizer, prompt, "")
        except PrefkdError:
            return False
        return True

    def _load(self):
        from transformers import AutoModelForSequenceClassification

        if self._model is None:
            try:
                model = AutoModelForSequenceClassification.from_pretrained(
                    self.name,
                    trust_remote_code=self.trust_remote_code,
                    dtype=_torch_dtype(self.dtype),
                    use_safetensors=None if self.allow_pickle else True,
                )
            except Exception as exc:  # noqa: BLE001
                raise self._error(exc) from exc
            model.config.pad_token_id = self.tokenizer.pad_token_id
            self._model = model.to(self.device).eval()
        return self._model

    def _max_length(self) -> int | None:
        n = getattr(self.tokenizer, "model_max_length", None)
        return int(n) if n is not None and n < 1_000_000 else None

    def score(self, prompts: list[list[dict]], answers: list[str]) -> list[float]:
        import torch

        if len(prompts) != len(answers):
            raise PrefkdError(f"{len(prompts)} prompts but {len(answers)} answers to score.")
        rendered = [reward_model_text(self.tokenizer, p, a) for p, a in zip(prompts, answers)]
        model = self._load()
        max_length = self._max_length()
        scores: list[float] = []
        with torch.no_grad():
            for rows in _batches(len(rendered), self.batch_size):
                # Texts of one batch share the special-token setting (it depends on the tokenizer only).
                enc = self.tokenizer(
                    [rendered[i][0] for i in rows],
                    add_special_tokens=rendered[rows[0]][1],
                    padding=True,
                    truncation=max_length is not None,
                    max_length=max_length,
                    return_tensors="pt",
                )
                enc = {k: v.to(self.device) for k, v in enc.items()}
                logits = model(**enc).logits
                scores.extend(logits[:, 0].float().cpu().tolist())
        return scores


def make_judge(spec: str, pos=None, neg=None, **kwargs):
    """``"implicit"`` -> ``ImplicitJudge(pos, neg)``; anything else names a reward model (path or HF id)."""
    if spec == IMPLICIT:
        if pos is None or neg is None:
            raise PrefkdError("The implicit judge needs both teacher models; pass --pos DIR and --neg DIR.")
        allowed = {k: v for k, v in kwargs.items() if k in ("batch_size", "device", "dtype")}
        return ImplicitJudge(pos, neg, **allowed)
    return RewardModelJudge(spec, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Win rate
# ---------------------------------------------------------------------------------------------------------


def outcomes(scores, baseline_scores) -> list[float]:
    """Per prompt: 1.0 when the model's score is above the baseline's, 0.5 when equal, else 0.0."""
    return [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline_scores)]


def win_rate(scores, baseline_scores) -> dict:
    """Per prompt (same prompts, same order) the model's score against the baseline's.

    Ties are exact equality and count one half: ``win_rate = (wins + 0.5 * ties) / prompts``, the mean of the
    per-prompt outcomes, whose bootstrap interval is ``win_rate_ci``.
    """
    scores, baseline_scores = [float(s) for s in scores], [float(s) for s in baseline_scores]
    if len(scores) != len(baseline_scores):
        raise PrefkdError(f"{len(scores)} model scores but {len(baseline_scores)} baseline scores; they must match.")
    n = len(scores)
    if n == 0:
        raise PrefkdError("No scored prompts to compare.")
    wins = sum(a > b for a, b in zip(scores, baseline_scores))
    ties = sum(a == b for a, b in zip(scores, baseline_scores))
    return {
        "prompts": n,
        "wins": wins,
        "ties": ties,
        "losses": n - wins - ties,
        "win_rate": (wins + 0.5 * ties) / n,
        "win_rate_ci": list(bootstrap_ci(outcomes(scores, baseline_scores))),
        "mean_score": sum(scores) / n,
        "baseline_mean_score": sum(baseline_scores) / n,
    }


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------


def write_jsonl(path, rows: list[dict]) -> None:
    """One JSON object per line, written atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_generations(path) -> list[dict]:
    """Rows of a generations.jsonl file (each with pair_id and score)."""
    path = Path(path)
    if not path.is_file():
        raise PrefkdError(f"There is no generations file at {path}; run `prefkd generate` first.")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows.append({**row, "pair_id": int(row["pair_id"]), "score": float(row["score"])})
        except (ValueError, KeyError, TypeError) as exc:
            raise PrefkdError(f"Line {n} of {path} is not a generation record with pair_id and score ({exc}).") from exc
    return rows


def generate_and_score(
    model_dir,
    data,
    judge,
    max_prompts: int = 0,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    seed: int = 1,
    device: str = "auto",
    dtype: str = "float32",
) -> tuple[list[dict], int]:
    """Generation records (pair_id, prompt, answer, score) of the model, and the number of prompts skipped.

    A prompt is skipped when the model's or the judge's chat template refuses it (strict templates reject
    some turn orders), so every record can be scored.
    """

    rows = load_prompts(data, max_prompts, seed)
    tokenizer = load_tokenizer(model_dir)
    kept = [r for r in rows if template_accepts(tokenizer, r["prompt"]) and judge.accepts(r["prompt"])]
    if not kept:
        raise PrefkdError(f"No prompt of {data} can be rendered by both the model's and the judge's chat templates.")
    prompts = [r["prompt"] for r in kept]
    answers = generate_answers(model_dir, prompts, max_new_tokens, batch_size, seed, device=device, dtype=dtype)
    scores = judge.score(prompts, answers)
    records = [
        {"pair_id": r["pair_id"], "prompt": r["prompt"], "answer": a, "score": s}
        for r, a, s in zip(kept, answers, scores)
    ]
    return records, len(rows) - len(kept)


# ---------------------------------------------------------------------------------------------------------
# CLI: prefkd generate / prefkd winrate
# ---------------------------------------------------------------------------------------------------------


def run_generate(s: GenerateSettings) -> int:
    start = time.time()
    extra = {} if s.judge == IMPLICIT else {"trust_remote_code": s.trust_remote_code, "allow_pickle": s.allow_pickle}
    judge = make_judge(s.judge, s.pos, s.neg, batch_size=s.batch_size, device=s.device, dtype=s.dtype, **extra)
    records, skipped = generate_and_score(
        s.model,
        s.data,
        judge,
        s.max_prompts,
        s.max_new_tokens,
        s.batch_size,
        s.seed,
        device=s.device,
        dtype=s.dtype,
    )
    write_jsonl(s.out, records)
    summary = {
        "model": str(s.model),
        "judge": s.judge,
        "prompts": len(records),
        "skipped": skipped,
        "mean_score": sum(r["score"] for r in records) / len(records),
        "empty_answers": sum(not r["answer"] for r in records),
        "seconds": round(time.time() - start, 1),
    }
    print(json.dumps(summary))
    return 0


def compare_generations(
    rows: list[dict], baseline_rows: list[dict], scores_path="model", baseline_path="baseline"
) -> dict:
    """``win_rate`` of two generation files that must cover the same pair_ids in the same order, with the
    per-prompt outcomes (``per_prompt``)."""
    ids, base_ids = [r["pair_id"] for r in rows], [r["pair_id"] for r in baseline_rows]
    if ids != base_ids:
        raise PrefkdError(
            f"{scores_path} and {baseline_path} do not cover the same pair_ids in the same order "
            f"({len(ids)} vs {len(base_ids)} rows); generate both with the same data and --max-prompts."
        )
    scores, base = [r["score"] for r in rows], [r["score"] for r in baseline_rows]
    per_prompt = [
        {"pair_id": i, "score": a, "baseline_score": b, "outcome": o}
        for i, a, b, o in zip(ids, scores, base, outcomes(scores, base))
    ]
    return {**win_rate(scores, base), "per_prompt": per_prompt}


def run_winrate(s: WinrateSettings) -> int:
    result = compare_generations(read_generations(s.scores), read_generations(s.baseline), s.scores, s.baseline)
    report = {"model": s.model, "baseline": s.baseline_name, "judge": s.judge_name, **result}
    write_json(s.out, report)
    print(json.dumps({k: report[k] for k in ("model", "baseline", "win_rate", "prompts")}))
    return 0
