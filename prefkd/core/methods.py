"""Student methods (CTPD, baselines, ablations) and the signal sets they read.

A *signal set* is one kind of signal shard (prefkd.training.signals): which models score
which role's ids, in which units, with which weight transform. A *method* is a
student training recipe: a preference loss over some signal set (optionally with
the reference log-probs of another set and an online KD term), pure KD on the
chosen responses, or the student SFT itself.

Everything here is plain data so the workflow, the CLI and the tests agree.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from prefkd.errors import PrefkdError


@dataclass(frozen=True)
class SignalSet:
    unit: str  # "span" | "token"
    ref: tuple[str, str]  # (model key, role)
    pos: tuple[str, str] | None = None
    neg: tuple[str, str] | None = None
    transform: str | None = None  # None: the configured CTPD transform
    aggregation: str | None = None  # None: the configured aggregation
    eos_weight: float | None = None  # the EOS unit's weight (TIS-DPO's code: 0); None: weighted like any unit
    contrast: str = "models"  # "sides": CTPD-Lite, the ref model on chosen vs rejected spans (prefkd.core.weights)


@dataclass(frozen=True)
class Method:
    kind: str  # "sft" | "preference" | "kd"
    label: str  # its row label in the report
    description: str
    unit: str | None = None
    weights: str | None = None  # signal set with weights (and reference log-probs)
    reference: str | None = None  # signal set whose reference log-probs replace the weights set's
    kd: str | None = None  # online KD term: dskd | uld | mined | cdm
    ablation: bool = False  # one of the paper's CTPD ablations (the report's ablation table)
    paper_ablation_avg: float | None = None  # the paper's ablation-table average (Qwen2.5-14B -> Llama-3.1-8B)


# Model keys: teacher-sft, teacher-pos, teacher-neg, student-sft, student-pos, student-neg.
SIGNAL_SETS: dict[str, SignalSet] = {
    "ctpd": SignalSet("span", ("teacher-sft", "teacher"), ("teacher-pos", "teacher"), ("teacher-neg", "teacher")),
    "ctpd-pos-ref": SignalSet(
        "span", ("teacher-pos", "teacher"), ("teacher-pos", "teacher"), ("teacher-neg", "teacher")
    ),
    # CTPD-Lite: no contrastive teachers; the teacher SFT scores both responses (and is the reference)
    "ctpd-lite": SignalSet("span", ("teacher-sft", "teacher"), contrast="sides"),
    "uniform": SignalSet("span", ("teacher-sft", "teacher"), transform="uniform"),
    "random": SignalSet("span", ("teacher-sft", "teacher"), transform="random"),
    "mean": SignalSet(
        "span", ("teacher-sft", "teacher"), ("teacher-pos", "teacher"), ("teacher-neg", "teacher"), aggregation="mean"
    ),
    "student-weights": SignalSet(
        "span", ("teacher-sft", "teacher"), ("student-pos", "student"), ("student-neg", "student")
    ),
    "mixed-pair": SignalSet("span", ("teacher-sft", "teacher"), ("teacher-pos", "teacher"), ("student-neg", "student")),
    "student-ref-span": SignalSet("span", ("student-sft", "student"), transform="uniform"),
    # TIS-DPO's released code gives the EOS token weight 0 (tokenize_batch_element appends [0] to the weights)
    "tisdpo": SignalSet(
        "token", ("student-sft", "student"), ("student-pos", "student"), ("student-neg", "student"), eos_weight=0.0
    ),
    "dpo-ref-student": SignalSet("token", ("student-sft", "student"), transform="uniform"),
}

# In the order of the paper's Table 1 (student SFT, baselines, CTPD, KD baselines, our variants),
# then the ablations in the order of the paper's ablation discussion.
METHODS: dict[str, Method] = {
    "sft": Method("sft", "student (SFT)", "student SFT only"),
    "dpo": Method("preference", "DPO", "DPO on the student, its SFT as reference", "token", "dpo-ref-student"),
    "tisdpo": Method(
        "preference",
        "TIS-DPO",
        "TIS-DPO: token weights from the student's own contrastive pair, EOS weight 0 as in TIS-DPO's code",
        "token",
        "tisdpo",
    ),
    "dskd": Method("kd", "DSKD", "dual-space KD with cross-model attention (Zhang et al. 2024)", kd="dskd"),
    "ctpd": Method(
        "preference",
        "CTPD",
        "CTPD: teacher span weights, teacher SFT span reference",
        "span",
        "ctpd",
        paper_ablation_avg=67.42,
    ),
    "uld": Method("kd", "ULD", "universal logit distillation (Boizard et al. 2024)", kd="uld"),
    "mined": Method("kd", "MinED", "minimum-edit-distance vocabulary mapping KD", kd="mined"),
    "cdm": Method("kd", "CDM", "contextual dynamic mapping KD (Chen et al. 2025)", kd="cdm"),
    "ctpd-lite": Method(
        "preference",
        "CTPD-Lite",
        "CTPD-Lite: no contrastive teachers; the teacher SFT scores both responses, s_i = l_T(p_i^chosen) -"
        " l_T(p_i^rejected) for spans paired by index, w_chosen = k exp(clamp(s_i, L, U)), w_rejected ="
        " k exp(-clamp(s_i, L, U)), unpaired tail spans and EOS weight 1; teacher SFT span reference",
        "span",
        "ctpd-lite",
    ),
    "ctpd+dskd": Method(
        "preference", "CTPD+DSKD", "CTPD plus alpha * DSKD on the chosen response", "span", "ctpd", kd="dskd"
    ),
    "ctpd-pos-ref": Method(
        "preference", "CTPD (pi+ reference)", "CTPD with pi+ as the reference (seed notes)", "span", "ctpd-pos-ref"
    ),
    "uniform": Method(
        "preference",
        "uniform weights",
        "ablation: uniform span weights",
        "span",
        "uniform",
        ablation=True,
        paper_ablation_avg=65.47,
    ),
    "mean": Method(
        "preference",
        "mean aggregation",
        "ablation: every span log-prob is the mean of its token log-probs instead of the sum -- the delta behind the"
        " weights, the teacher reference and the student's policy term alike (the CTPD authors' average_log_prob"
        " switch, which their weight script and trainer apply to all three)",
        "span",
        "mean",
        ablation=True,
    ),
    "random": Method(
        "preference",
        "random weights",
        "ablation: random span weights, uniform in [0.7, 1.3] on the chosen and the rejected response alike, drawn"
        " independently per span (seeded by the signals seed, the pair and the side), as the authors' random ablation",
        "span",
        "random",
        ablation=True,
        paper_ablation_avg=54.80,
    ),
    "student-weights": Method(
        "preference",
        "student-estimated weights",
        "ablation: weights from the student's contrastive pair",
        "span",
        "student-weights",
        ablation=True,
        paper_ablation_avg=65.88,
    ),
    "mixed-pair": Method(
        "preference",
        "teacher/student mixed pair",
        "ablation: pi+ of the teacher, pi- of the student",
        "span",
        "mixed-pair",
        ablation=True,
        paper_ablation_avg=64.51,
    ),
    "student-ref": Method(
        "preference",
        "student as reference",
        "ablation: student SFT as reference",
        "span",
        "ctpd",
        reference="student-ref-span",
        ablation=True,
        paper_ablation_avg=65.27,
    ),
}

DEMO_METHODS = ("sft", "dpo", "tisdpo", "ctpd", "uld", "ctpd-lite")


def method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise PrefkdError(f"unknown student method {name!r}; the methods are: {', '.join(METHODS)}.") from None


def resolve_methods(names: list[str]) -> list[str]:
    """Expand "all" and check every name."""
    out: list[str] = []
    for name in names:
        for n in METHODS if name == "all" else [name]:
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


def models_for_set(name: str, sets: dict[str, SignalSet] = SIGNAL_SETS) -> list[str]:
    """The model keys (``teacher-sft``, ``student-pos``, ...) that the signal set ``name`` loads."""
    s = sets[name]
    return sorted({x[0] for x in (s.ref, s.pos, s.neg) if x})


def signal_plan(methods: list[str], reference: str = "sft") -> dict[str, SignalSet]:
    """The signal sets a run computes: every set the ``methods`` read, and CTPD's for the weight statistics
    unless a read set weighs spans without contrastive models (CTPD-Lite's: then a run that lists only such
    methods trains no teacher pair); with ``reference="pos"`` CTPD's reference span log-probs come from pi+."""
    needed = signal_sets_for(methods)
    lite = any(SIGNAL_SETS[n].contrast == "sides" for n in needed)
    names = ([] if lite and "ctpd" not in needed else ["ctpd"]) + [n for n in needed if n != "ctpd"]
    plan = {name: SIGNAL_SETS[name] for name in names}
    if reference == "pos" and "ctpd" in plan:
        plan["ctpd"] = replace(plan["ctpd"], ref=("teacher-pos", "teacher"))
    return plan


def teacher_reference_methods() -> set[str]:
    """Methods whose preference loss uses a teacher model's log-probs as its reference."""
    return {
        name
        for name, m in METHODS.items()
        if (m.reference or m.weights) and SIGNAL_SETS[m.reference or m.weights].ref[0].startswith("teacher")
    }
