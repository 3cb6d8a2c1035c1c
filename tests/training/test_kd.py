"""Cross-tokenizer KD terms (prefkd.training.kd) on hand-computable tensors, plus a real-vocabulary MinED map.

Layout used throughout (one row; P = prompt, E = EOS, "." = padding):

    student  tokens  P  P  s0 s1a s1b E          units -1 -1 0 1 1 2
    teacher  tokens  P  P  P  t0  t1  E  .       units -1 -1 -1 0 1 2 -1

Span 1 is two student tokens but one teacher token. Aligned unit-start predictions (CDM):
unit 0 -> (student pos 1, teacher pos 2), unit 1 -> (2, 3), EOS unit -> (4, 4); the student's
prediction at 3 (inside span 1) has no counterpart. ULD pairs by order: student predictions
1, 2, 3, 4 and teacher predictions 2, 3, 4 give (1, 2), (2, 3), (3, 4).
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from prefkd.errors import PrefkdError
from prefkd.training.kd import CDM, DSKD, KD_NAMES, ULD, KDSide, MinED, build_kd, build_mined_map, kd_mix
from prefkd.training.kd.mined import mined_map_from_vocabs
from prefkd.training.kd.pairing import aligned_unit_predictions, ordered_response_predictions
from prefkd.training.kd.strings import TokenizerStrings, vocab_list

S_UNITS = [[-1, -1, 0, 1, 1, 2]]
S_TARGET = [[0, 0, 1, 1, 1, 1]]
T_UNITS = [[-1, -1, -1, 0, 1, 2, -1]]
T_TARGET = [[0, 0, 0, 1, 1, 1, 0]]
S_ALIGNED, T_ALIGNED = [1, 2, 4], [2, 3, 4]
S_ULD, T_ULD = [1, 2, 3], [2, 3, 4]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: intra-op threads only add barrier stalls (badly so on a loaded 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def side(logits, units, target, input_ids=None, hidden=None) -> KDSide:
    b, t = logits.shape[:2]
    if input_ids is None:
        input_ids = torch.zeros(b, t, dtype=torch.long)
    return KDSide(
        logits=logits,
        hidden=hidden,
        input_ids=input_ids,
        unit_ids=torch.tensor(units, dtype=torch.long),
        target_mask=torch.tensor(target, dtype=torch.float32),
    )


def logits_with(rows: dict[int, list[float]], length: int, vocab: int, seed: int = 0, scale: float = 1.0):
    """[1, length, vocab] random logits whose rows at the given positions are scale * log(probs)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(1, length, vocab, generator=g) * 3
    for pos, probs in rows.items():
        out[0, pos] = scale * torch.log(torch.tensor(probs, dtype=torch.float32))
    return out


def perturb(logits: torch.Tensor, positions, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = logits.detach().clone()
    for p in positions:
        out[:, p] = torch.randn(out.shape[0], out.shape[-1], generator=g) * 50
    return out


# ----------------------------------------------------------------------------- pairing


def test_pairings_follow_units_and_response_order():
    s = side(torch.zeros(1, 6, 3), S_UNITS, S_TARGET)
    t = side(torch.zeros(1, 7, 5), T_UNITS, T_TARGET)
    b, ps, pt = aligned_unit_predictions(s, t)
    assert b.tolist() == [0, 0, 0] and ps.tolist() == S_ALIGNED and pt.tolist() == T_ALIGNED
    b, ps, pt = ordered_response_predictions(s, t)
    assert b.tolist() == [0, 0, 0] and ps.tolist() == S_ULD and pt.tolist() == T_ULD


def test_unit_pairing_from_shard_rows():
    """KDSide.unit_ids built with prefkd.data.batches.unit_ids (span ids + EOS unit) pair as documented."""
    from prefkd.data.batches import unit_ids

    row = {
        "student_chosen_input_ids": [9, 9, 5, 6, 7, 2],
        "student_prompt_len": 2,
        "student_chosen_span_ids": [-1, -1, 0, 1, 1, -1],
        "teacher_chosen_input_ids": [9, 9, 9, 5, 6, 2],
        "teacher_prompt_len": 3,
        "teacher_chosen_span_ids": [-1, -1, -1, 0, 1, -1],
        "chosen_num_spans": 2,
        "chosen_truncated": False,
    }
    su, _ = unit_ids(row, "student", "chosen", "span")
    tu, _ = unit_ids(row, "teacher", "chosen", "span")
    s = side(torch.zeros(1, 6, 3), [su.tolist()], S_TARGET)
    t = side(torch.zeros(1, 7, 5), [tu.tolist() + [-1]], T_TARGET)
    _, ps, pt = aligned_unit_predictions(s, t)
    assert ps.tolist() == S_ALIGNED and pt.tolist() == T_ALIGNED


# ----------------------------------------------------------------------------- ULD

P_S3 = [0.5, 0.3, 0.2]
P_T5 = [0.1, 0.4, 0.2, 0.2, 0.1]
# sorted: [.5 .3 .2 0 0] vs [.4 .2 .2 .1 .1] -> .1 + .1 + 0 + .1 + .1
ULD_HAND = 0.4


def uld_case(scale: float = 1.0, swap: bool = False):
    s_rows = {p: P_S3 for p in S_ULD}
    t_rows = {p: P_T5 for p in T_ULD}
    s_logits = logits_with(s_rows, 6, 3, seed=1, scale=scale).requires_grad_()
    t_logits = logits_with(t_rows, 7, 5, seed=2, scale=scale).requires_grad_()
    if swap:  # the student has the larger vocabulary
        s_logits = logits_with({p: P_T5 for p in S_ULD}, 6, 5, seed=1, scale=scale).requires_grad_()
        t_logits = logits_with({p: P_S3 for p in T_ULD}, 7, 3, seed=2, scale=scale).requires_grad_()
    return s_logits, t_logits


@pytest.mark.parametrize("swap", [False, True])
def test_uld_hand_value(swap):
    s_logits, t_logits = uld_case(swap=swap)
    loss, metrics = ULD(temperature=1.0)(side(s_logits, S_UNITS, S_TARGET), side(t_logits, T_UNITS, T_TARGET))
    assert loss.item() == pytest.approx(ULD_HAND, abs=1e-6)
    assert metrics["kd_positions"] == 3
    loss.backward()
    assert s_logits.grad is not None and s_logits.grad.abs().sum() > 0
    assert t_logits.grad is None


def test_uld_temperature():
    # logits 2 log p at T = 2 give back p: the same 0.4
    s_logits, t_logits = uld_case(scale=2.0)
    s, t = side(s_logits, S_UNITS, S_TARGET), side(t_logits, T_UNITS, T_TARGET)
    assert ULD(temperature=2.0)(s, t)[0].item() == pytest.approx(ULD_HAND, abs=1e-6)
    # at T = 1 the same logits are p^2 / sum p^2: [.6579 .2368 .1053] vs [.6154 .1538 .1538 .0385 .0385]
    assert ULD(temperature=1.0)(s, t)[0].item() == pytest.approx(0.251012, abs=1e-5)


def test_uld_zero_for_permuted_distributions():
    perm = [0.1, 0.2, 0.4, 0.1, 0.2]
    s_logits = logits_with({p: P_T5 for p in S_ULD}, 6, 5, seed=1)
    t_logits = logits_with({p: perm for p in T_ULD}, 7, 5, seed=2)
    loss, _ = ULD(1.0)(side(s_logits, S_UNITS, S_TARGET), side(t_logits, T_UNITS, T_TARGET))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    # different vocabulary sizes: teacher mass on 3 ids, the rest ~0
    t_logits = logits_with({p: [1e-12, 0.2, 1e-12, 0.5, 0.3] for p in T_ULD}, 7, 5, seed=2)
    s_logits = logits_with({p: P_S3 for p in S_ULD}, 6, 3, seed=1)
    loss, _ = ULD(1.0)(side(s_logits, S_UNITS, S_TARGET), side(t_logits, T_UNITS, T_TARGET))
    assert loss.item() == pytest.approx(0.0, abs=1e-5)


# ----------------------------------------------------------------------------- MinED map

TEACHER_VOCAB = {"▁the": 0, "▁cat": 1, "ing": 2, "▁runn": 3, "<0x41>": 4, "xyz": 5, "kitten": 6, "abc": 7}
STUDENT_VOCAB = {
    "Ġthe": 0,
    "Ġca": 1,
    "Ġcats": 2,
    "ing": 3,
    "Ġrun": 4,
    "A": 5,
    "xy": 6,
    "sitten": 7,
    "kit": 8,
    "abe": 9,
    "abd": 10,
}


def test_mined_map_hand_verified():
    mapping = mined_map_from_vocabs(TEACHER_VOCAB, STUDENT_VOCAB)
    assert mapping.dtype == torch.long
    assert mapping.tolist() == [
        0,  # '▁the' == 'Ġthe' once both markers are spaces
        1,  # ' cat': ' ca' (prefix, distance 1) beats ' cats' (also distance 1): prefix first
        3,  # 'ing' exact, different id
        4,  # ' runn' -> ' run' (prefix, distance 1)
        5,  # '<0x41>' is the byte 'A'
        6,  # 'xyz' -> 'xy'
        7,  # 'kitten' -> 'sitten' (distance 1) rather than the prefix 'kit' (distance 3)
        9,  # 'abc': 'abe' and 'abd' both at distance 1, no substring: lowest id
    ]


def test_mined_map_fixed_and_excluded():
    mapping = mined_map_from_vocabs(TEACHER_VOCAB, STUDENT_VOCAB, fixed={7: 0}, student_excluded={6})
    assert mapping[7].item() == 0
    # 'xy' excluded: 'xyz' shares no byte with any candidate -> distance 3 to every 3-byte token,
    # the lowest such id is ' ca' (1)
    assert mapping[5].item() == 1


# ----------------------------------------------------------------------------- MinED loss

# MinED as the DSKD authors' baseline implements it (criterions/min_edit_dis_kld.py, after FuseLLM): the token
# sequences of the two models are aligned by dynamic time warping (DTW) with the edit distance of the token strings
# (space markers removed) as the cost; a student prediction whose input token is aligned to exactly one teacher
# token, and that token maps (MinED vocabulary map) to the student's input token, learns the teacher's projected
# distribution; every other student prediction learns a one-hot distribution on its own target token. Loss: the
# forward KL at temperature T, no T^2 factor, here averaged over the student's predictions.
#
# Student (positions 0-4): "\n" the cats sat </s>   -> predictions at 0-3 (input tokens "\n" the cats sat)
# Teacher (positions 0-5): "]" the cat s sat </s>    -> predictions at 0-4 (input tokens "]" the cat s sat)
MINED_T_VOCAB = {"]": 0, "▁the": 1, "▁cat": 2, "s": 3, "▁sat": 4, "</s>": 5}
MINED_S_VOCAB = {"Ġthe": 0, "Ġcats": 1, "Ġsat": 2, "Ġca": 3, "\n": 4, "<|im_end|>": 5}
MINED_T2S = torch.tensor([4, 0, 3, 1, 2, 5])  # "▁cat" -> "Ġca" (the prefix MinED prefers), so "cats" is not consistent
# edit distances (rows: teacher ] the cat s sat; columns: student \n the cats sat), worked by hand
MINED_COST = np.array([[1, 3, 4, 3], [3, 0, 4, 3], [3, 3, 1, 1], [1, 3, 3, 2], [3, 3, 2, 0]])
# DTW (cumulative cost 4): student 0 <- teacher 0, 1 <- 1, 2 <- 2, 3 <- {3, 4}
MINED_PATH = [[0], [1], [2], [3, 4]]
P_T = {0: [0.1, 0.5, 0.1, 0.1, 0.1, 0.1], 1: [0.05, 0.05, 0.6, 0.2, 0.05, 0.05]}
Q_S = {
    0: [0.25, 0.15, 0.15, 0.15, 0.15, 0.15],
    1: [1 / 6] * 6,
    2: [0.1, 0.1, 0.5, 0.1, 0.1, 0.1],
    3: [0.04, 0.04, 0.04, 0.04, 0.04, 0.8],
}
# position 0: teacher "]" -> student "\n" (map[0] = 4 = the student's input): projected [.5 .1 .1 .1 .1 .1] vs Q_S[0]
KL0 = 0.5 * math.log(0.5 / 0.25) + 5 * 0.1 * math.log(0.1 / 0.15)
# position 1: " the" -> " the": projected [.05 .2 .05 .6 .05 .05] vs uniform
KL1 = 4 * 0.05 * math.log(0.05 * 6) + 0.2 * math.log(0.2 * 6) + 0.6 * math.log(0.6 * 6)
# position 2: " cats" <- " cat", but map[" cat"] = " ca" != " cats": one-hot on the target " sat" (id 2)
# position 3: " sat" <- {"s", " sat"} (one-to-many): one-hot on the target </s> (id 5)
MINED_HAND = (KL0 + KL1 - math.log(0.5) - math.log(0.8)) / 4


def mined_case(scale: float = 1.0):
    s_ids = torch.tensor([[4, 0, 1, 2, 5]])
    t_ids = torch.tensor([[0, 1, 2, 3, 4, 5]])
    s_logits = logits_with(Q_S, 5, 6, seed=3, scale=scale).requires_grad_()
    t_logits = logits_with(P_T, 6, 6, seed=4, scale=scale).requires_grad_()
    s = side(s_logits, [[-1, 0, 1, 2, 3]], [[0, 1, 1, 1, 1]], input_ids=s_ids)
    t = side(t_logits, [[-1, 0, 1, 2, 3, 4]], [[0, 1, 1, 1, 1, 1]], input_ids=t_ids)
    return s, t


def mined_term(temperature: float) -> MinED:
    return MinED(MINED_T2S, vocab_list(MINED_T_VOCAB), vocab_list(MINED_S_VOCAB), temperature=temperature)


def test_dtw_alignment_hand_example():
    from prefkd.training.kd.dtw import dtw_align, token_edit_costs

    t_pieces, s_pieces = vocab_list(MINED_T_VOCAB), vocab_list(MINED_S_VOCAB)
    cost = token_edit_costs([t_pieces[i] for i in range(5)], [s_pieces[i] for i in (4, 0, 1, 2)])
    np.testing.assert_array_equal(cost, MINED_COST)
    path, total = dtw_align(MINED_COST)
    assert path == MINED_PATH and total == 4
    # the DSKD / simpledtw tie-break walking back: diagonal, then up (teacher), then left (student)
    assert dtw_align(np.zeros((2, 2)))[0] == [[0], [1]]
    assert dtw_align(np.zeros((1, 3)))[0] == [[0], [0], [0]]
    assert dtw_align(np.zeros((3, 1)))[0] == [[0, 1, 2]]


def test_mined_closed_form():
    s, t = mined_case()
    loss, metrics = mined_term(1.0)(s, t)
    assert loss.item() == pytest.approx(MINED_HAND, abs=1e-6)
    assert metrics["kd_positions"] == 4 and metrics["kd_aligned"] == pytest.approx(0.5)
    loss.backward()
    assert s.logits.grad.abs().sum() > 0 and t.logits.grad is None
    # T = 2 on doubled logits: the same distributions and the same value (no T^2 factor, as in DSKD's MinED)
    s, t = mined_case(scale=2.0)
    assert mined_term(2.0)(s, t)[0].item() == pytest.approx(MINED_HAND, abs=1e-5)


def test_mined_is_zero_when_the_student_matches_its_targets():
    s, t = mined_case()
    with torch.no_grad():  # student = projected teacher where aligned, (nearly) one-hot on the target elsewhere
        s.logits[0, 0] = torch.log(torch.tensor([0.5, 0.1, 0.1, 0.1, 0.1, 0.1]))
        s.logits[0, 1] = torch.log(torch.tensor([0.05, 0.2, 0.05, 0.6, 0.05, 0.05]))
        s.logits[0, 2] = torch.tensor([-50.0, -50, 50, -50, -50, -50])
        s.logits[0, 3] = torch.tensor([-50.0, -50, -50, -50, -50, 50])
    assert mined_term(1.0)(s, t)[0].item() == pytest.approx(0.0, abs=1e-6)


def test_mined_projection_keeps_mass_and_drops_padding_columns():
    kd = MinED(torch.tensor([1, 0, 0]), [b"a", b"b", b"c"], [b"a", b"b"], temperature=1.0)
    # a fourth teacher column (an embedding padding row) is outside the map: dropped, renormalised
    z = torch.log(torch.tensor([[0.5, 0.3, 0.2, 1e-30]]))
    p = kd.project(z, 2)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert p[0].tolist() == pytest.approx([0.5, 0.5], abs=1e-6)


# ----------------------------------------------------------------------------- CDM


def cdm_case(t_probs, s_probs, vt, vs):
    s_logits = logits_with({p: s_probs for p in S_ALIGNED}, 6, vs, seed=5).requires_grad_()
    t_logits = logits_with({p: t_probs for p in T_ALIGNED}, 7, vt, seed=6).requires_grad_()
    return side(s_logits, S_UNITS, S_TARGET), side(t_logits, T_UNITS, T_TARGET)


def test_cdm_when_every_token_matches_exactly():
    teacher = {"a": 0, "b": 1, "c": 2}
    student = {"c": 0, "a": 1, "b": 2}
    s, t = cdm_case([0.5, 0.3, 0.2], [0.1, 0.6, 0.3], 3, 3)
    cdm = CDM.from_vocabs(teacher, student, temperature=1.0, topk=3)
    loss, metrics = cdm(s, t)
    # mapped teacher over student ids (c, a, b) = [.2, .5, .3] vs [.1, .6, .3]
    hand = 0.2 * math.log(0.2 / 0.1) + 0.5 * math.log(0.5 / 0.6)  # = 0.047468
    assert loss.item() == pytest.approx(hand, abs=1e-6)
    assert metrics["kd_matched"] == pytest.approx(1.0)
    loss.backward()
    assert s.logits.grad.abs().sum() > 0 and t.logits.grad is None


def test_cdm_dynamic_mapping_in_context():
    teacher = {"running": 0, "the": 1, "zzz": 2}
    student = {"the": 0, "runnin": 1, "qqq": 2, "cat": 3}
    t_probs = [0.5, 0.3, 0.2]  # running, the, zzz
    s_probs = [0.4, 0.35, 0.05, 0.2]  # the, runnin, qqq, cat -> student top-3: the, runnin, cat
    s, t = cdm_case(t_probs, s_probs, 3, 4)
    # 'the' <-> 'the' exactly; 'running' has no exact match but 'runnin' is in the student's top-3 at
    # this position at normalised distance 1/13 < 0.1; 'zzz' and 'cat' find nothing close: dropped.
    # Support {(running, runnin), (the, the)}: p = [.5, .3] / .8, q = [.35, .4] / .75
    p, q = [0.625, 0.375], [0.35 / 0.75, 0.4 / 0.75]
    hand = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))  # = 0.050502
    loss, _ = CDM.from_vocabs(teacher, student, temperature=1.0, topk=3, threshold=0.1)(s, t)
    assert loss.item() == pytest.approx(hand, abs=1e-5)
    # a stricter threshold leaves only (the, the): a one-point support, KL 0
    loss, _ = CDM.from_vocabs(teacher, student, temperature=1.0, topk=3, threshold=0.05)(s, t)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    # 'runnin' outside the student's top-2 (context) -> no dynamic match for 'running' either
    loss, _ = CDM.from_vocabs(teacher, student, temperature=1.0, topk=1, threshold=0.1)(s, t)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_cdm_zero_for_identical_distributions():
    vocab = {"a": 0, "b": 1, "c": 2, "d": 3}
    probs = [0.4, 0.1, 0.3, 0.2]
    s, t = cdm_case(probs, probs, 4, 4)
    loss, _ = CDM.from_vocabs(vocab, vocab, temperature=2.0, topk=2)(s, t)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------- DSKD

DS, DT, VS, VT = 6, 10, 11, 13


def embeds(seed: int = 5):
    """Input embedding tables of both models, different from their heads (untied models)."""
    torch.manual_seed(seed)
    return torch.nn.Embedding(VS, DS), torch.nn.Embedding(VT, DT)


def dskd_case(seed: int = 0):
    """Two rows with different prompt lengths, padding and response lengths on each side."""
    g = torch.Generator().manual_seed(seed)
    s_head = torch.nn.Linear(DS, VS, bias=False)
    t_head = torch.nn.Linear(DT, VT, bias=False)
    s_target = torch.tensor([[0, 0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1]], dtype=torch.float32)
    t_target = torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1, 0]], dtype=torch.float32)
    s_ids = torch.randint(0, VS, (2, 7), generator=g)
    t_ids = torch.randint(0, VT, (2, 8), generator=g)
    s_hidden = torch.randn(2, 7, DS, generator=g).requires_grad_()
    t_hidden = torch.randn(2, 8, DT, generator=g).requires_grad_()
    s_logits = torch.randn(2, 7, VS, generator=g).requires_grad_()
    t_logits = torch.randn(2, 8, VT, generator=g).requires_grad_()
    s = KDSide(s_logits, s_hidden, s_ids, torch.full((2, 7), -1), s_target)
    t = KDSide(t_logits, t_hidden, t_ids, torch.full((2, 8), -1), t_target)
    return s, t, s_head, t_head


def dskd(s_head, t_head, temperature=2.0, **kw):
    s_embed, t_embed = embeds()
    return DSKD(s_head, t_head, DS, DT, temperature, student_embed=s_embed, teacher_embed=t_embed, **kw)


def test_dskd_gradients_reach_student_and_projectors_only():
    torch.manual_seed(1)
    s, t, s_head, t_head = dskd_case()
    s_embed, t_embed = embeds()
    kd = build_kd(
        "dskd",
        2.0,
        student_head=s_head,
        teacher_head=t_head,
        student_embed=s_embed,
        teacher_embed=t_embed,
        student_dim=DS,
        teacher_dim=DT,
        accuracy_gate=False,
    )
    assert isinstance(kd, DSKD)
    params = list(kd.parameters())
    assert len(params) == 6 and all(p.requires_grad for p in params)  # query, t2s, s2t (weight + bias)
    assert not any(p is s_head.weight or p is t_head.weight for p in params)
    loss, metrics = kd(s, t)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() >= 0
    assert set(metrics) >= {"kd", "kd_t2s_ce", "kd_t2s_kl", "kd_s2t_kl", "kd_t2s_acc"}
    loss.backward()
    for p in params:
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert s.hidden.grad.abs().sum() > 0 and s.logits.grad.abs().sum() > 0
    assert t.hidden.grad is None and t.logits.grad is None
    assert t_head.weight.grad is None and s_head.weight.grad is None
    assert s_embed.weight.grad is None and t_embed.weight.grad is None


def _kl(p_logits, q_logits, temperature):
    p = np.exp(p_logits / temperature) / np.exp(p_logits / temperature).sum()
    q = np.exp(q_logits / temperature) / np.exp(q_logits / temperature).sum()
    return float(np.sum(p * np.log(p / q)))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_dskd_hand_value_has_no_temperature_squared(temperature):
    """One prediction per side, so each attention weight is 1 and each projected hidden state is the value of the
    single other-side position; the value projectors are set to constants (weight 0, bias b). By DSKD's formulas
    (criterions/dual_space_kd_with_cross_model_attention.py, KL at temperature T, no T^2):

        t2s = head_s(b_s);  s2t = head_t(b_t)
        KD  = CE(t2s, y_s) + KL(softmax(t2s / T) || softmax(z_s / T)) + KL(softmax(z_t / T) || softmax(s2t / T))
    """
    ds, dt = 2, 2
    s_head, t_head = torch.nn.Linear(ds, 3, bias=False), torch.nn.Linear(dt, 4, bias=False)
    with torch.no_grad():
        s_head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        t_head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.5, 0.5]]))
    kd = DSKD(
        s_head, t_head, ds, dt, temperature,
        student_embed=torch.nn.Embedding(3, ds), teacher_embed=torch.nn.Embedding(4, dt), accuracy_gate=False,
    )  # fmt: skip
    b_s, b_t = [0.5, -1.0], [2.0, 1.0]
    with torch.no_grad():
        kd.t2s.weight.zero_()
        kd.t2s.bias.copy_(torch.tensor(b_s))
        kd.s2t.weight.zero_()
        kd.s2t.bias.copy_(torch.tensor(b_t))
    z_s, z_t = [0.3, -0.2, 1.0], [1.0, 0.0, -1.0, 2.0]
    y_s = 2  # the student's target token
    s = KDSide(
        torch.tensor([[z_s, [0.0, 0.0, 0.0]]]), torch.randn(1, 2, ds), torch.tensor([[0, y_s]]),
        torch.tensor([[-1, 0]]), torch.tensor([[0.0, 1.0]]),
    )  # fmt: skip
    t = KDSide(
        torch.tensor([[z_t, [0.0] * 4]]), torch.randn(1, 2, dt), torch.tensor([[1, 3]]),
        torch.tensor([[-1, 0]]), torch.tensor([[0.0, 1.0]]),
    )  # fmt: skip
    loss, metrics = kd(s, t)

    t2s = np.array([b_s[0], b_s[1], b_s[0] + b_s[1]])  # head_s(b_s) = [0.5, -1.0, -0.5]
    s2t = np.array([b_t[0], b_t[1], -b_t[0], 0.5 * (b_t[0] + b_t[1])])  # head_t(b_t) = [2, 1, -2, 1.5]
    ce = -(t2s[y_s] - np.log(np.exp(t2s).sum()))
    kl_t2s = _kl(t2s, np.array(z_s), temperature)
    kl_s2t = _kl(np.array(z_t), s2t, temperature)
    assert metrics["kd_t2s_ce"] == pytest.approx(ce, abs=1e-5)
    assert metrics["kd_t2s_kl"] == pytest.approx(kl_t2s, abs=1e-5)
    assert metrics["kd_s2t_kl"] == pytest.approx(kl_s2t, abs=1e-5)
    assert loss.item() == pytest.approx(ce + kl_t2s + kl_s2t, abs=1e-5)


def test_dskd_index_embeddings_come_from_the_input_embedding_modules():
    """DSKD's query and key are [embedding of the input token; embedding of the target token] from each model's
    input embedding table (``model.model.embed_tokens``), which differs from the LM head of an untied model."""
    torch.manual_seed(1)
    s, t, s_head, t_head = dskd_case()
    s_embed, t_embed = embeds()
    seen = {}
    s_embed.register_forward_hook(lambda m, inp, out: seen.setdefault("student", []).append(inp[0].clone()))
    t_embed.register_forward_hook(lambda m, inp, out: seen.setdefault("teacher", []).append(inp[0].clone()))
    kd = DSKD(s_head, t_head, DS, DT, 2.0, student_embed=s_embed, teacher_embed=t_embed, accuracy_gate=False)
    loss, _ = kd(s, t)
    # the student table looked up the input and target ids of its predictions (0 elsewhere, as DSKD does)
    ms = torch.zeros(2, 7, dtype=torch.bool)
    ms[:, :-1] = s.target_mask[:, 1:] > 0
    inputs, targets = seen["student"]
    assert torch.equal(inputs, torch.where(ms, s.input_ids, 0))
    assert torch.equal(targets[:, :-1], torch.where(ms[:, :-1], s.input_ids[:, 1:], 0))
    assert len(seen["teacher"]) == 2
    # head rows as embeddings (the old behaviour, wrong for untied models) give another value
    head_rows = DSKD(
        s_head, t_head, DS, DT, 2.0,
        student_embed=torch.nn.Embedding.from_pretrained(s_head.weight.detach()),
        teacher_embed=torch.nn.Embedding.from_pretrained(t_head.weight.detach()),
        accuracy_gate=False,
    )  # fmt: skip
    head_rows.load_state_dict(kd.state_dict())
    assert head_rows(s, t)[0].item() != pytest.approx(loss.item(), abs=1e-4)
    loss.backward()
    assert s_embed.weight.grad is None and t_embed.weight.grad is None
    assert kd.query.weight.grad.abs().sum() > 0 and s.logits.grad.abs().sum() > 0
    with pytest.raises(PrefkdError, match="input embedding"):
        DSKD(s_head, t_head, DS, DT, 2.0)


def test_dskd_accuracy_gate_still_trains_student_hidden():
    torch.manual_seed(1)
    s, t, s_head, t_head = dskd_case()
    kd = dskd(s_head, t_head)  # gate on (the authors' release)
    loss, _ = kd(s, t)
    loss.backward()
    assert s.hidden.grad.abs().sum() > 0 and t.hidden.grad is None


def test_dskd_training_projectors_reduces_loss():
    """The projectors are trained by CE(t->s) + KL(teacher space); the student-space KL has a detached
    target (it trains the student only), so with the student held fixed it may grow as the projected
    teacher gets sharper. Training projectors and student together lowers the whole term."""
    torch.manual_seed(1)
    s, t, s_head, t_head = dskd_case()
    kd = dskd(s_head, t_head)
    opt = torch.optim.Adam(kd.parameters(), lr=3e-2)

    def projector_objective(m):
        return m["kd_t2s_ce"] + m["kd_s2t_kl"]

    first = projector_objective(kd(s, t)[1])
    for _ in range(30):
        loss, _ = kd(s, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert projector_objective(kd(s, t)[1]) < 0.7 * first

    torch.manual_seed(1)
    s, t, s_head, t_head = dskd_case()
    kd = dskd(s_head, t_head)
    opt = torch.optim.Adam(list(kd.parameters()) + [s.logits, s.hidden], lr=1e-1)
    first = kd(s, t)[0].item()
    for _ in range(40):
        loss, _ = kd(s, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert kd(s, t)[0].item() < 0.7 * first


# ----------------------------------------------------------------------------- all terms: masking, finiteness


def all_terms():
    s_head = torch.nn.Linear(DS, 5, bias=False)
    t_head = torch.nn.Linear(DT, 7, bias=False)
    vocab_s = {"a": 0, "b": 1, "c": 2, "d": 3, "e": 4}
    vocab_t = {"b": 0, "a": 1, "x": 2, "cc": 3, "d": 4, "e": 5, "f": 6}
    return {
        "uld": ULD(2.0),
        "mined": MinED.from_vocabs(vocab_t, vocab_s, temperature=2.0),
        "cdm": CDM.from_vocabs(vocab_t, vocab_s, temperature=2.0, topk=4),
        "dskd": DSKD(
            s_head,
            t_head,
            DS,
            DT,
            2.0,
            student_embed=torch.nn.Embedding(5, DS),
            teacher_embed=torch.nn.Embedding(7, DT),
            accuracy_gate=False,
        ),  # fmt: skip
    }


@pytest.mark.parametrize("name", ["uld", "mined", "cdm", "dskd"])
def test_masked_positions_do_not_matter(name):
    torch.manual_seed(3)
    kd = all_terms()[name]
    g = torch.Generator().manual_seed(4)
    s_hidden, t_hidden = torch.randn(1, 6, DS, generator=g), torch.randn(1, 7, DT, generator=g)
    s_logits, t_logits = torch.randn(1, 6, 5, generator=g), torch.randn(1, 7, 7, generator=g)
    s_ids, t_ids = torch.randint(0, 5, (1, 6), generator=g), torch.randint(0, 7, (1, 7), generator=g)

    def run(sl, tl, sh, th):
        s = KDSide(sl, sh, s_ids, torch.tensor(S_UNITS), torch.tensor(S_TARGET, dtype=torch.float32))
        t = KDSide(tl, th, t_ids, torch.tensor(T_UNITS), torch.tensor(T_TARGET, dtype=torch.float32))
        return kd(s, t)[0]

    base = run(s_logits, t_logits, s_hidden, t_hidden)
    assert torch.isfinite(base) and base.item() >= 0
    # never predictions: student 0 (predicts a prompt token) and 5 (last); teacher 0, 1 (prompt), 5, 6 (EOS, pad)
    s_out, t_out = [0, 5], [0, 1, 5, 6]
    if name == "cdm":
        s_out = s_out + [3]  # inside span 1: no teacher counterpart (MinED uses it: DTW-aligned or one-hot)
    if name == "uld":
        s_out = s_out + [4]  # the student's 4th prediction has no 4th teacher prediction
    changed = run(
        perturb(s_logits, s_out), perturb(t_logits, t_out), perturb(s_hidden, s_out), perturb(t_hidden, t_out)
    )
    assert changed.item() == pytest.approx(base.item(), abs=1e-6)
    # ... while a contributing position does matter
    moved = run(perturb(s_logits, [2]), t_logits, perturb(s_hidden, [2]), t_hidden)
    assert moved.item() != pytest.approx(base.item(), abs=1e-6)


@pytest.mark.parametrize("name", ["uld", "mined", "cdm", "dskd"])
def test_no_response_gives_zero_with_graph(name):
    kd = all_terms()[name]
    s_logits = torch.randn(1, 6, 5, requires_grad=True)
    s_hidden = torch.randn(1, 6, DS, requires_grad=True)
    s = KDSide(s_logits, s_hidden, torch.zeros(1, 6, dtype=torch.long), torch.full((1, 6), -1), torch.zeros(1, 6))
    t = KDSide(
        torch.randn(1, 7, 7),
        torch.randn(1, 7, DT),
        torch.zeros(1, 7, dtype=torch.long),
        torch.full((1, 7), -1),
        torch.zeros(1, 7),
    )
    loss, _ = kd(s, t)
    assert loss.item() == 0.0
    loss.backward()  # does not raise


def test_kd_mix_and_factory_errors():
    ce, kd = torch.tensor(2.0), torch.tensor(4.0)
    assert kd_mix(ce, kd).item() == pytest.approx(3.0)
    assert kd_mix(ce, kd, kappa=0.25).item() == pytest.approx(2.5)
    with pytest.raises(PrefkdError, match="one of dskd, uld, mined, cdm"):
        build_kd("nope")
    with pytest.raises(PrefkdError, match="tokenizers"):
        build_kd("mined")
    with pytest.raises(PrefkdError, match="heads"):
        build_kd("dskd")
    with pytest.raises(PrefkdError, match="no option 'topk'"):
        build_kd("uld", topk=5)
    assert isinstance(build_kd("uld", 2.0), ULD)


# ----------------------------------------------------------------------------- real vocabularies


def test_mined_map_on_real_vocabularies(teacher_tokenizer, student_tokenizer, tmp_path):
    from prefkd.training.kd.mined import _MINED_CACHE
    from prefkd.training.kd.strings import _STRINGS_CACHE

    _MINED_CACHE.clear()
    _STRINGS_CACHE.clear()
    start = time.perf_counter()
    mapping = build_mined_map(teacher_tokenizer, student_tokenizer, cache_dir=tmp_path)
    seconds = time.perf_counter() - start
    print(f"MinED map Mistral(32768) -> Qwen2.5(151665): {seconds:.2f} s")
    assert seconds < 20  # about 2.5 s on 2 CPU cores (1.2 s of it decoding both vocabularies to bytes)
    assert mapping.shape == (len(teacher_tokenizer),) and mapping.dtype == torch.long
    assert int(mapping.min()) >= 0 and int(mapping.max()) < len(student_tokenizer)

    def t_id(piece):
        return teacher_tokenizer.convert_tokens_to_ids(piece)

    def s_id(piece):
        return student_tokenizer.convert_tokens_to_ids(piece)

    assert mapping[t_id("▁the")].item() == s_id("Ġthe")
    assert mapping[t_id("<0x0A>")].item() == s_id("Ċ")  # byte fallback newline -> byte-level newline
    assert mapping[teacher_tokenizer.eos_token_id].item() == student_tokenizer.eos_token_id
    # regular teacher tokens never land on a student special token
    special_s = set(student_tokenizer.all_special_ids) | set(student_tokenizer.added_tokens_decoder)
    special_t = set(teacher_tokenizer.all_special_ids) | set(teacher_tokenizer.added_tokens_decoder)
    regular = np.array([i for i in range(len(teacher_tokenizer)) if i not in special_t])
    assert not set(mapping[regular].tolist()) & special_s
    # the on-disk cache gives the same map
    _MINED_CACHE.clear()
    assert list(tmp_path.glob("mined-*.npy"))
    assert torch.equal(build_mined_map(teacher_tokenizer, student_tokenizer, cache_dir=tmp_path), mapping)


def test_mined_and_cdm_run_on_real_vocab_sizes(teacher_tokenizer, student_tokenizer):
    """Random logits of the demo models' sizes (Qwen2.5 has 151936 logit rows > 151665 tokens)."""
    torch.manual_seed(1)
    s_logits = torch.randn(1, 6, 151936, requires_grad=True)
    t_logits = torch.randn(1, 7, 32768)
    s = side(s_logits, S_UNITS, S_TARGET)
    t = side(t_logits, T_UNITS, T_TARGET)
    for name in ("mined", "cdm"):
        kd = build_kd(name, 2.0, teacher_tokenizer=teacher_tokenizer, student_tokenizer=student_tokenizer)
        loss, metrics = kd(s, t)
        # MinED: every student prediction (DTW-aligned or one-hot); CDM: the three aligned unit starts
        assert torch.isfinite(loss) and loss.item() >= 0 and metrics["kd_positions"] == {"mined": 4, "cdm": 3}[name]
        loss.backward()
    assert s_logits.grad.abs().sum() > 0


def test_all_terms_end_to_end_on_real_shard_rows(teacher_tokenizer, student_tokenizer):
    """Demo pairs -> tokenize_pairs -> batches.unit_ids -> tiny Mistral / Qwen2 models -> every KD term.

    Also a cross-check of the unit alignment with the MinED map: at aligned predictions whose next
    tokens on both sides are the same bytes, the map sends the teacher's next token to the student's.
    """
    import transformers

    from prefkd.assets.models import TINY_ARCHS
    from prefkd.data.batches import unit_ids
    from prefkd.data.demo import generate_demo_pairs
    from prefkd.data.tokenize_align import ModelTokens, tokenize_pairs

    records = [dict(pair_id=i, **p) for i, p in enumerate(generate_demo_pairs(3, seed=1))]
    table, _ = tokenize_pairs(records, ModelTokens(teacher_tokenizer), ModelTokens(student_tokenizer), 256, 128)
    rows = table.to_pylist()

    def _pad(seqs, value):
        out = torch.full((len(seqs), max(len(x) for x in seqs)), value, dtype=torch.long)
        for i, x in enumerate(seqs):
            out[i, : len(x)] = torch.as_tensor(np.asarray(x), dtype=torch.long)
        return out

    def view(role, model, pad_id):
        seqs = [np.asarray(r[f"{role}_chosen_input_ids"]) for r in rows]
        ids = _pad(seqs, pad_id)
        units = _pad([unit_ids(r, role, "chosen", "span")[0] for r in rows], -1)
        target = torch.zeros(ids.shape)
        for i, r in enumerate(rows):
            target[i, r[f"{role}_prompt_len"] : len(seqs[i])] = 1.0
        attention = torch.arange(ids.shape[1])[None] < torch.tensor([len(s) for s in seqs])[:, None]
        out = model(input_ids=ids, attention_mask=attention.long(), output_hidden_states=True)
        return KDSide(out.logits, out.hidden_states[-1], ids, units, target)

    torch.manual_seed(1)
    teacher = transformers.MistralForCausalLM(transformers.MistralConfig(**TINY_ARCHS["mistral"])).eval()
    student = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY_ARCHS["qwen2"]))
    with torch.no_grad():
        t = view("teacher", teacher, teacher_tokenizer.pad_token_id)
    s = view("student", student, student_tokenizer.pad_token_id)

    mapping = build_mined_map(teacher_tokenizer, student_tokenizer)
    b, ps, pt = aligned_unit_predictions(s, t)
    n_units = sum(unit_ids(r, "student", "chosen", "span")[1] for r in rows)
    assert b.numel() == n_units  # one aligned prediction per span (+ EOS)
    s_next, t_next = s.input_ids[b, ps + 1], t.input_ids[b, pt + 1]
    t_bytes = TokenizerStrings.from_tokenizer(teacher_tokenizer).pieces
    s_bytes = TokenizerStrings.from_tokenizer(student_tokenizer).pieces
    same = torch.tensor([t_bytes[i] == s_bytes[j] for i, j in zip(t_next.tolist(), s_next.tolist())])
    assert same.float().mean() > 0.5
    assert torch.equal(mapping[t_next[same]], s_next[same])

    heads = dict(
        student_head=student.get_output_embeddings(),
        teacher_head=teacher.get_output_embeddings(),
        student_embed=student.get_input_embeddings(),
        teacher_embed=teacher.get_input_embeddings(),
    )
    for name in KD_NAMES:
        extra = heads if name == "dskd" else {}
        kd = build_kd(name, 2.0, teacher_tokenizer=teacher_tokenizer, student_tokenizer=student_tokenizer, **extra)
        student.zero_grad()
        loss, metrics = kd(s, t)
        assert torch.isfinite(loss) and loss.item() >= 0, (name, metrics)
        loss.backward(retain_graph=True)
        assert student.model.embed_tokens.weight.grad is not None, name
        assert all(p.grad is None for p in teacher.parameters()), name
