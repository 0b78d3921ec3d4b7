"""Local search across the micro-batches of one step (pure, numpy).

    micro = refine_step(tab, micro)     # list of micro-batches, each [(degree, [seq ids])]

Chunking first and assigning groups per micro-batch second leaves two kinds of waste that no
per-micro-batch solver can see: idle rank-time in micro-batches whose groups finish before the
slowest one, and memory left over in groups whose sequences are shorter than d x K. Every
micro-batch also pays b1 (0.63 s for GPT-7B on A100-40GB), so a step with fewer micro-batches
is cheaper at equal work. The moves here work on the whole step (objective: the sum of the
micro-batch makespans):

- pour: move sequences of a micro-batch into groups of other micro-batches where they fit in
  memory and finish before that micro-batch's makespan (free: those ranks idled), then re-plan
  what is left of the donor; a donor that empties disappears with its b1;
- dissolve: the same for the cheapest micro-batch while allowing the receivers to grow, kept
  when the step gets shorter;
- critical moves: a sequence of a micro-batch's slowest group to any group of another
  micro-batch when the sum of the two makespans falls.

Grouping never become empty (every rank works, as the plan requires), except when the whole
micro-batch empties and is dropped.
"""

from __future__ import annotations

import time

import numpy as np

from seqpar.scatter.costmodel import CostTable
from seqpar.scatter.greedy import Grouping, greedy_groups, improve

EPS = 1e-9


class StepState:
    """Every group of every micro-batch of a step, with per-algorithm running sums.

    Arrays over groups g (removed groups keep their row with ``alive[g] = False``):
    S: float64 [G, A] seconds of the group per algorithm (constant + sequences; 1e30 where the
    algorithm cannot run); tok, cap: int64 [G] tokens held and d x K; gi: int64 [G] degree
    index into the cost table; mb: int64 [G] micro-batch. ids[g]: the group's sequence ids.
    """

    def __init__(self, tab: CostTable, micro: list[Grouping]) -> None:
        self.tab = tab
        self.ids: list[list[int]] = []
        self.members: list[list[int]] = []  # groups of each micro-batch
        rows, tok, cap, gi, mb, deg = [], [], [], [], [], []
        for m, groups in enumerate(micro):
            self.members.append([])
            for d, ids in groups:
                self.members[m].append(len(self.ids))
                self.ids.append(list(ids))
                rows.append(self._sums(d, ids))
                tok.append(tab.tokens(ids))
                cap.append(d * tab.cm.capacity)
                gi.append(tab.deg_index[d])
                mb.append(m)
                deg.append(d)
        self.S = np.array(rows, dtype=np.float64).reshape(len(rows), -1)
        self.tok = np.array(tok, dtype=np.int64)
        self.cap = np.array(cap, dtype=np.int64)
        self.gi = np.array(gi, dtype=np.int64)
        self.mb = np.array(mb, dtype=np.int64)
        self.deg = np.array(deg, dtype=np.int64)
        self.alive = np.ones(len(rows), dtype=bool)
        self.T = np.array([self._mb_time(m) for m in range(len(micro))], dtype=np.float64)

    def _sums(self, d: int, ids) -> np.ndarray:
        idx = np.asarray(ids, dtype=np.int64)
        return self.tab.cm.group_const(d) + self.tab.all[idx, self.tab.deg_index[d], :].sum(axis=0)

    def _mb_time(self, m: int) -> float:
        return float(self.S[self.members[m]].min(axis=1).max()) if self.members[m] else 0.0

    @property
    def total(self) -> float:
        return float(self.T.sum())

    def snapshot(self) -> tuple:
        return ([list(x) for x in self.ids], [list(x) for x in self.members], self.S.copy(), self.tok.copy(),
                self.alive.copy(), self.T.copy(), len(self.ids))

    def restore(self, snap: tuple) -> None:
        ids, members, S, tok, alive, T, n = snap
        self.ids, self.members, self.S, self.tok, self.alive, self.T = ids, members, S, tok, alive, T
        for name in ("cap", "gi", "mb", "deg"):  # rows appended after the snapshot are dropped
            setattr(self, name, getattr(self, name)[:n])

    # -- moves -------------------------------------------------------------------------------
    def insert_deltas(self, i: int, exclude_mb: int) -> tuple[np.ndarray, np.ndarray]:
        """Per group: (increase of its micro-batch's makespan, new group time) if sequence i
        joined it; inf where it does not fit in memory, is removed, or is in ``exclude_mb``."""
        new_t = (self.S + self.tab.all[i, self.gi, :]).min(axis=1)
        delta = np.maximum(0.0, new_t - self.T[self.mb])
        bad = ~self.alive | (self.mb == exclude_mb) | (self.tok + self.tab.lengths[i] > self.cap)
        delta[bad] = np.inf
        return delta, new_t

    def move(self, i: int, a: int, b: int) -> None:
        """Sequence i from group a to group b (either may be -1: out of / into nowhere)."""
        L, row = int(self.tab.lengths[i]), self.tab.all[i]
        for g, sign in ((a, -1), (b, 1)):
            if g < 0:
                continue
            self.S[g] += sign * row[self.gi[g]]
            self.tok[g] += sign * L
            if sign < 0:
                self.ids[g].remove(i)
            else:
                self.ids[g].append(i)
        for m in {int(self.mb[g]) for g in (a, b) if g >= 0}:
            self.T[m] = self._mb_time(m)

    def replace_mb(self, m: int, groups: Grouping | None) -> None:
        """Give micro-batch m new groups (None or [] drops it)."""
        for g in self.members[m]:
            self.alive[g] = False
        self.members[m] = []
        cm = self.tab.cm
        for d, ids in groups or []:
            self.members[m].append(len(self.ids))
            self.ids.append(list(ids))
            self.S = np.vstack([self.S, self._sums(d, ids)[None, :]])
            self.tok = np.append(self.tok, self.tab.tokens(ids))
            self.cap = np.append(self.cap, d * cm.capacity)
            self.gi = np.append(self.gi, self.tab.deg_index[d])
            self.mb = np.append(self.mb, m)
            self.deg = np.append(self.deg, d)
            self.alive = np.append(self.alive, True)
        self.T[m] = self._mb_time(m)

    def micro(self) -> list[Grouping]:
        out = []
        for m in np.argsort(-self.T, kind="stable"):  # longest micro-batch first, as planned
            if self.members[m]:
                out.append([(int(self.deg[g]), list(self.ids[g])) for g in self.members[m]])
        return out


def _where(st: StepState, m: int) -> dict[int, int]:
    return {i: g for g in st.members[m] for i in st.ids[g]}


def pour(st: StepState, m: int, allow_cost: bool = False, allow_degree1: bool = True, all_busy: bool = True) -> bool:
    """Move micro-batch m's sequences (longest first) into other micro-batches, then re-plan
    what is left of m with the greedy; kept only when the step gets shorter.

    Without ``allow_cost`` a sequence moves only where it does not lengthen the receiver (into
    idle rank-time), to the group that it leaves the least slack in (best fit, so large gaps
    stay for large sequences); with it, to the group whose micro-batch grows least (dissolve).
    """
    snap, before = st.snapshot(), st.total
    where = _where(st, m)
    n_before = len(where)
    for i in sorted(where, key=lambda i: -int(st.tab.lengths[i])):
        delta, new_t = st.insert_deltas(i, m)
        if allow_cost:
            b = int(np.argmin(delta))
            if not np.isfinite(delta[b]):
                continue
        else:
            slack = np.where(delta <= EPS, st.T[st.mb] - new_t, np.inf)
            b = int(np.argmin(slack))
            if not np.isfinite(slack[b]):
                continue
        st.move(i, where.pop(i), b)
    if len(where) == n_before:
        return False  # nothing moved: the state is untouched
    if where:
        current = [(int(st.deg[g]), list(st.ids[g])) for g in st.members[m]]
        if all(ids for _, ids in current):  # every group kept a sequence: tighten it in place
            groups = improve(st.tab, current)
        else:  # re-plan the rest from scratch
            groups = greedy_groups(st.tab, sorted(where), allow_degree1, all_busy)
            if groups is None:
                st.restore(snap)
                return False
        st.replace_mb(m, groups)
    else:
        st.replace_mb(m, None)
    if st.total < before - EPS:
        return True
    st.restore(snap)
    return False


def critical_moves(st: StepState, max_moves: int = 200) -> int:
    """Move sequences off each micro-batch's slowest group into another micro-batch while the
    summed makespan falls; returns the number of moves."""
    done = 0
    for m in np.argsort(-st.T):
        while done < max_moves and st.members[m]:
            times = st.S[st.members[m]].min(axis=1)
            k = int(np.argmax(times))
            a = st.members[m][k]
            if len(st.ids[a]) < 2:
                break
            rest = float(np.delete(times, k).max()) if len(times) > 1 else 0.0
            best = None
            for i in st.ids[a]:
                new_a = max(rest, float(np.min(st.S[a] - st.tab.all[i, st.gi[a]])))
                gain = st.T[m] - new_a
                if gain <= EPS:
                    continue
                delta, _ = st.insert_deltas(i, m)
                b = int(np.argmin(delta))
                if delta[b] < gain - EPS and (best is None or delta[b] - gain < best[0]):
                    best = (float(delta[b] - gain), i, b)
            if best is None:
                break
            st.move(best[1], a, best[2])
            done += 1
    return done


def refine_step(tab: CostTable, micro: list[Grouping], allow_degree1: bool = True, all_busy: bool = True,
                rounds: int = 4, deadline: float = float("inf")) -> list[Grouping]:
    """Cross-micro-batch local search (see the module doc); never returns a longer step.

    Each round: critical moves, a free pour of every micro-batch (cheapest first), then a
    costed dissolve of the cheapest one; stops after a round without gain, after ``rounds``,
    or once ``time.perf_counter()`` passes ``deadline`` (checked between moves).
    """
    st = StepState(tab, micro)
    for _ in range(rounds):
        before = st.total
        critical_moves(st)
        for m in np.argsort(st.T):
            if time.perf_counter() > deadline:
                break
            if st.members[m]:
                pour(st, int(m), False, allow_degree1, all_busy)
        live = [m for m in range(len(st.members)) if st.members[m]]
        if len(live) > 1 and time.perf_counter() <= deadline:
            pour(st, min(live, key=lambda m: st.T[m]), True, allow_degree1, all_busy)
        if st.total >= before - EPS or time.perf_counter() > deadline:
            break
    return st.micro()
