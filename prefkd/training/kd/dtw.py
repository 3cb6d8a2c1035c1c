"""Edit distances between token strings and the dynamic-time-warping (DTW) alignment of two token sequences.

This is the sequence alignment of the MinED baseline as FuseLLM (Wan et al. 2024) introduced it and the DSKD
authors' ``criterions/min_edit_dis_kld.py`` runs it: the cost of pairing teacher token i with student token j is
the edit distance of their strings with the space markers removed, and DTW finds the monotone alignment of least
total cost. Token strings here are the exact bytes each id stands for (``TokenizerStrings``), so SentencePiece's
``<0x0A>`` and byte-level BPE's ``Ċ`` are both ``b"\\n"``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def edit_distances(query: bytes, mat: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Levenshtein distance between ``query`` and every row of ``mat`` (padded with -1), row lengths ``lens``.

    One dynamic-programming row per query byte, vectorised over candidates; the insertion chain
    inside a row is a running minimum (``min_k D[k] + (j - k)`` = cummin(D - j) + j).
    """
    m, width = mat.shape
    ar = np.arange(width + 1, dtype=np.int32)
    d = np.broadcast_to(ar, (m, width + 1)).copy()
    new = np.empty_like(d)
    for i, byte in enumerate(query):
        cost = (mat != byte).astype(np.int32)
        new[:, 0] = i + 1
        np.minimum(d[:, 1:] + 1, d[:, :-1] + cost, out=new[:, 1:])
        d = np.minimum.accumulate(new - ar, axis=1) + ar
    return d[np.arange(m), lens]


def _padded(strings: Sequence[bytes], pad: int) -> tuple[np.ndarray, np.ndarray]:
    lens = np.array([len(x) for x in strings], dtype=np.int64)
    mat = np.full((len(strings), int(lens.max()) if len(lens) else 0), pad, dtype=np.int16)
    for r, x in enumerate(strings):
        mat[r, : len(x)] = np.frombuffer(x, dtype=np.uint8)
    return mat, lens


def token_edit_costs(teacher: Sequence[bytes], student: Sequence[bytes]) -> np.ndarray:
    """[len(teacher), len(student)] edit distances between the token strings, ASCII spaces removed (the space
    markers ``▁`` / ``Ġ`` that the DSKD code strips decode to spaces).

    One DP over all pairs of distinct strings at once: a row per byte of the teacher strings (pad -1), vectorised
    over [teacher string, student string] (pad -2), the insertion chain a running minimum.
    """
    t_strings = [t.replace(b" ", b"") for t in teacher]
    s_strings = [x.replace(b" ", b"") for x in student]
    t_unique, t_index = np.unique(np.array(t_strings, dtype=object), return_inverse=True)
    s_unique, s_index = np.unique(np.array(s_strings, dtype=object), return_inverse=True)
    a, la = _padded(list(t_unique), -1)  # [U_t, La]
    b, lb = _padded(list(s_unique), -2)  # [U_s, Lb]
    ar = np.arange(b.shape[1] + 1, dtype=np.int32)
    d = np.broadcast_to(ar, (len(a), len(b), len(ar))).copy()  # [U_t, U_s, Lb + 1]
    new = np.empty_like(d)
    for i in range(a.shape[1]):
        cost = (b[None, :, :] != a[:, i, None, None]).astype(np.int32)  # [U_t, U_s, Lb]
        new[..., 0] = i + 1
        np.minimum(d[..., 1:] + 1, d[..., :-1] + cost, out=new[..., 1:])
        active = (i < la)[:, None, None]
        d = np.where(active, np.minimum.accumulate(new - ar, axis=-1) + ar, d)
    dist = np.take_along_axis(d, np.broadcast_to(lb[None, :, None], (len(a), len(b), 1)), axis=-1)[..., 0]
    return dist[t_index.reshape(-1)][:, s_index.reshape(-1)].astype(np.int64)


def dtw_align(cost: np.ndarray) -> tuple[list[list[int]], float]:
    """DTW of series 1 (rows of ``cost``, the teacher) against series 2 (columns, the student).

    ``D[i, j] = cost[i, j] + min(D[i-1, j], D[i, j-1], D[i-1, j-1])`` with ``D[-1, -1] = 0`` and infinite
    borders, computed one anti-diagonal at a time. The path is walked back from the last cell, at each step to the
    smallest of the diagonal, upper and left cells (ties in that order), as the simpledtw code that FuseLLM and DSKD
    use does. Returns, for every column j, the rows aligned to it (increasing), and the total cost ``D[-1, -1]``.
    """
    n, m = cost.shape
    if n == 0 or m == 0:
        return [[] for _ in range(m)], 0.0
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    c = np.asarray(cost, dtype=np.float64)
    for diag in range(2, n + m + 1):  # cells (i, j) of acc with i + j = diag, 1 <= i <= n, 1 <= j <= m
        i = np.arange(max(1, diag - m), min(n, diag - 1) + 1)
        j = diag - i
        best = np.minimum(np.minimum(acc[i - 1, j], acc[i, j - 1]), acc[i - 1, j - 1])
        acc[i, j] = c[i - 1, j - 1] + best
    d = acc[1:, 1:]
    path: list[list[int]] = [[] for _ in range(m)]
    i, j = n - 1, m - 1
    while i > 0 or j > 0:
        path[j].append(i)
        diag_v = d[i - 1, j - 1] if i > 0 and j > 0 else np.inf
        up_v = d[i - 1, j] if i > 0 else np.inf
        left_v = d[i, j - 1] if j > 0 else np.inf
        move = int(np.argmin([diag_v, up_v, left_v]))
        i, j = (i - 1, j - 1) if move == 0 else (i - 1, j) if move == 1 else (i, j - 1)
    path[0].append(0)
    return [sorted(rows) for rows in path], float(d[-1, -1])
