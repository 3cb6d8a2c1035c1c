"""Cross-tokenizer knowledge-distillation (KD) terms: DSKD-CMA, ULD, MinED and CDM.

Every term is a ``KDLoss`` module with one signature::

    loss, metrics = kd(student: KDSide, teacher: KDSide)

where each ``KDSide`` is one model's view of the same batch of chosen responses (same rows, same
order; each model with its own tokens, chat template and padding). The caller mixes the term with the
student's cross-entropy: ``kd_mix(ce, kd, kappa) = (1 - kappa) * ce + kappa * kd`` (kappa 0.5,
temperature 2 in the method spec).

Conventions shared by all terms
-------------------------------
* ``logits[b, t]`` predicts token ``t + 1``; ``target_mask[b, t] = 1`` marks the tokens to be predicted
  (response tokens, EOS included, t >= 1). So the *prediction positions* of a row are the t with
  ``target_mask[b, t + 1] = 1``. Logits and hidden states at other positions (prompt, padding,
  and for MinED / CDM also the inside of multi-token spans) never influence a loss.
* Teacher tensors are detached inside every term: the teacher gets no gradient, ever.
* A loss is the mean over its contributing positions; with none it is an exact 0 that still has a
  graph to the student (so a step with an empty batch is harmless). ``metrics`` are plain floats.
* Temperature ``T`` divides both models' logits. The KL terms of DSKD and MinED are not multiplied by
  T^2, as in the DSKD authors' code of both; CDM's KL is (Hinton's gradient-scale correction); the ULD
  distance is not (it is a bounded L1 distance, in [0, 2]).

Position alignment (CDM)
------------------------
The shards give every response token an aligned *unit*: span k is the same bytes on both sides, and
a final EOS unit is the same "end of response" on both sides (``prefkd.data.batches.unit_ids``). A
prediction is comparable across the two models only when both have seen exactly the same text and
are about to produce the same text boundary. That holds at the *first token of every unit*: the
student's prediction made just before the first student token of unit k and the teacher's
prediction made just before the first teacher token of unit k both condition on the prompt plus
units 0..k-1 (the same bytes) and both predict "the next token starting at the byte where unit k
starts" (for the EOS unit: the end of the response). So one aligned pair per unit present on both
sides; for the usual 1:1 spans that is every prediction, inside a multi-token span the predictions
after its first token are skipped (their contexts differ between the models). This replaces the
DTW alignment of token strings used by CDM's code with an exact byte alignment.

MinED keeps its baseline's own alignment: DTW of the two token sequences with the token strings' edit
distance as the cost (``prefkd.training.kd.dtw``, see ``MinED``). ULD pairs positions by order within
the response (the i-th response prediction of the student with the i-th of the teacher, for i < the
shorter length), as Boizard et al. do. DSKD needs no pairing: its cross-model attention aligns
positions softly.

What each term needs from a ``KDSide``
--------------------------------------
========  ======  ======  =========  ========  ===========
term      logits  hidden  input_ids  unit_ids  target_mask
========  ======  ======  =========  ========  ===========
ULD       yes     --      --         --        yes
MinED     yes     --      yes        --        yes
CDM       yes     --      --         yes       yes
DSKD      yes     yes     yes        --        yes
========  ======  ======  =========  ========  ===========
"""

from __future__ import annotations

from prefkd.errors import PrefkdError
from prefkd.training.kd.base import NO_ID, KDLoss, KDSide, kd_mix
from prefkd.training.kd.cdm import CDM
from prefkd.training.kd.dskd import DSKD
from prefkd.training.kd.mined import MinED, build_mined_map
from prefkd.training.kd.uld import ULD
from prefkd.training.settings import KD_NAMES

__all__ = [
    "CDM",
    "DSKD",
    "KD_NAMES",
    "NO_ID",
    "KDLoss",
    "KDSide",
    "MinED",
    "ULD",
    "build_kd",
    "build_mined_map",
    "kd_mix",
]


def build_kd(
    name: str,
    temperature: float = 2.0,
    teacher_tokenizer=None,
    student_tokenizer=None,
    student_head=None,
    teacher_head=None,
    student_dim=None,
    teacher_dim=None,
    student_embed=None,
    teacher_embed=None,
    **options,
) -> KDLoss:
    """A KD term by name: ``dskd`` (needs both models' LM heads and input embedding modules; other terms ignore
    them), ``uld``, ``mined`` and ``cdm`` (need both tokenizers).

    Extra ``options`` (anything else is an error): mined -> ``cache_dir``; cdm -> ``topk``,
    ``threshold``, ``max_token_bytes``, ``chunk``; dskd -> ``accuracy_gate``.
    """
    key = str(name).lower()
    allowed = {
        "uld": set(),
        "mined": {"cache_dir"},
        "cdm": {"topk", "threshold", "max_token_bytes", "chunk"},
        "dskd": {"accuracy_gate"},
    }
    if key not in allowed:
        raise PrefkdError(f"the KD term must be one of {', '.join(KD_NAMES)}, got {name!r}.")
    unknown = sorted(set(options) - allowed[key])
    if unknown:
        raise PrefkdError(
            f"the {key} KD term has no option {unknown[0]!r}; its options are: {', '.join(sorted(allowed[key])) or 'none'}."
        )
    if key == "uld":
        return ULD(temperature)
    if key in ("mined", "cdm") and (teacher_tokenizer is None or student_tokenizer is None):
        raise PrefkdError(f"the {key} KD term needs both tokenizers (teacher_tokenizer=, student_tokenizer=).")
    if key == "mined":
        return MinED.from_tokenizers(teacher_tokenizer, student_tokenizer, temperature, options.get("cache_dir"))
    if key == "cdm":
        return CDM.from_tokenizers(teacher_tokenizer, student_tokenizer, temperature=temperature, **options)
    return DSKD(
        student_head,
        teacher_head,
        student_dim,
        teacher_dim,
        temperature,
        student_embed=student_embed,
        teacher_embed=teacher_embed,
        **options,
    )
