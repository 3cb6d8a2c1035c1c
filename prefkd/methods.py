"""Student methods (CTPD, baselines, ablations) and the signal sets they read.

A *signal set* is one kind of signal shard (prefkd.signals): which models score
which role's ids, in which units, with which weight transform. A *method* is a
student training recipe: a preference loss over some signal set (optionally with
the reference log-probs of another set and an online KD term), pure KD on the
chosen responses, or the student SFT itself.

Everything here is plain data so the workflow, the CLI and the tests agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prefkd.errors import PrefkdError


@dataclass(frozen=True)
class SignalSet:
    unit: str  # "span" | "token"
    ref: tuple[str, str]  # (model key, role)
    pos: tuple[str, str] | None = None
    neg: tuple[str, str] | None = None
    transform: str | None = None  # None: the configured CTPD transform
    aggregation: str | None = None  # None: the configured aggregation


@dataclass(frozen=True)
class Method:
    kind: str  # "sft" | "preference" | "kd"
    description: str
    unit: str | None = None
    weights: str | None = None  # signal set with weights (and reference log-probs)
    reference: str | None = None  # signal set whose reference log-probs replace the weights set's
    kd: str | None = None  # online KD term: dskd | uld | mined | cdm
    needs: tuple[str, ...] = field(default=())  # extra models (e.g. the student contrastive pair)


# Model keys: teacher-sft, teacher-pos, teacher-neg, student-sft, student-pos, student-neg.
SIGNAL_SETS: dict[str, SignalSet] = {
    "ctpd": SignalSet("span", ("teacher-sft", "teacher"), ("teacher-pos", "teacher"), ("teacher-neg", "teacher")),
    "ctpd-pos-ref": SignalSet("span", ("teacher-pos", "teacher"), ("teacher-pos", "teacher"), ("teacher-neg", "teacher")),
    "uniform": SignalSet("span", ("teacher-sft", "teacher"), transform="uniform"),
    "random": SignalSet("span", ("teacher-sft", "teacher"), transform="random"),
    "mean": SignalSet("span", ("teacher-sft", "teacher"), ("teacher-pos", "teacher"), ("teacher-neg", "teacher"), aggregation="mean"),
    "student-weights": SignalSet("span", ("teacher-sft", "teacher"), ("student-pos", "student"), ("student-neg", "student")),
    "mixed-pair": SignalSet("span", ("teacher-sft", "teacher"), ("teacher-pos", "teacher"), ("student-neg", "student")),
    "student-ref-span": SignalSet("span", ("student-sft", "student"), transform="uniform"),
    "tisdpo": SignalSet("token", ("student-sft", "student"), ("student-pos", "student"), ("student-neg", "student")),
    "dpo-ref-student": SignalSet("token", ("student-sft", "student"), transform="uniform"),
}

METHODS: dict[str, Method] = {
    "sft": Method("sft", "student SFT only"),
    "dpo": Method("preference", "DPO on the student, its SFT as reference", "token", "dpo-ref-student"),
    "tisdpo": Method("preference", "TIS-DPO: token weights from the student's own contrastive pair", "token", "tisdpo"),
    "ctpd": Method("preference", "CTPD: teacher span weights, teacher SFT span reference", "span", "ctpd"),
    "ctpd-pos-ref": Method("preference", "CTPD with pi+ as the reference (seed notes)", "span", "ctpd-pos-ref"),
    "ctpd+dskd": Method("preference", "CTPD plus alpha * DSKD on the chosen response", "span", "ctpd", kd="dskd"),
    "uniform": Method("preference", "ablation: uniform span weights", "span", "uniform"),
    "mean": Method("preference", "ablation: mean instead of sum aggregation", "span", "mean"),
    "random": Method("preference", "ablation: random span weights", "span", "random"),
    "student-weights": Method("preference", "ablation: weights from the student's contrastive pair", "span", "student-weights"),
    "mixed-pair": Method("preference", "ablation: pi+ of the teacher, pi- of the student", "span", "mixed-pair"),
    "student-ref": Method("preference", "ablation: student SFT as reference", "span", "ctpd", reference="student-ref-span"),
    "dskd": Method("kd", "dual-space KD with cross-model attention (Zhang et al. 2024)", kd="dskd"),
    "uld": Method("kd", "universal logit distillation (Boizard et al. 2024)", kd="uld"),
    "mined": Method("kd", "minimum-edit-distance vocabulary mapping KD", kd="mined"),
    "cdm": Method("kd", "contextual dynamic mapping KD (Chen et al. 2025)", kd="cdm"),
}

DEMO_METHODS = ("sft", "dpo", "tisdpo", "ctpd", "uld")


def method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise PrefkdError(f"unknown student method {name!r}; the methods are: {', '.join(METHODS)}.") from None


def resolve_methods(names: list[str]) -> list[str]:
    """Expand "all" and check every name."""
    out: list[str] = []
    for name in names:
        for n in (METHODS if name == "all" else [name]):
            method(n)
            if n not in out:
                out.append(n)
    return out


def signal_sets_for(methods: list[str]) -> list[str]:
    """The signal sets the given methods read, in a stable order."""
    needed = []
    for name in methods:
        m = method(name)
        for s in (m.weights, m.reference):
            if s and s not in needed:
                needed.append(s)
    return needed


def models_for_set(name: str) -> list[str]:
    s = SIGNAL_SETS[name]
    return sorted({x[0] for x in (s.ref, s.pos, s.neg) if x})
