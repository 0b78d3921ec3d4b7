"""Variable sequence-length curriculum over a dataset decomposition.

Each optimizer step trains on one bucket ``k``: ``2^(max - k) * base_batch`` pieces of
``2^k + 1`` tokens, packed as ``base_batch`` streams of ``2^(max - k)`` pieces, so every step
has ``base_batch * 2^max`` targets whatever the bucket. Which bucket is a pure function of
(bucket sizes, odds, rule, cycles, seed, step):

- odds per bucket, shortest first: ``CURRICULA`` (uniform, grow_linear, grow_p2) or custom;
- rule ``"paper"``: P(k) ~ odds[k] over buckets that still hold a full batch in this cycle;
  rule ``"released"``: P(k) ~ odds[k] x the bucket's share of the targets left in this cycle;
- cycles: each bucket's pieces are split into ``cycles`` equal parts, one per cycle, so the
  length goes short-to-long ``cycles`` times per epoch (the sawtooth); after the last cycle a
  new epoch starts with fresh seed-derived draws and piece orders.

Pieces of bucket k are consumed in a seeded permutation per epoch, so ``step_streams(t)`` is
random access: resuming at step t needs only t (all ranks compute the same schedule).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from seqpar.data.streams import Stream

CURRICULA: dict[str, list[int]] = {"uniform": [1, 1, 1, 1, 1, 1],
                                   "grow_linear": [6, 5, 4, 3, 2, 1],
                                   "grow_p2": [32, 16, 8, 4, 2, 1]}
RULES: tuple[str, ...] = ("paper", "released")
_KEEP_PERMS = 16  # (epoch, bucket) piece orders kept in memory


def curriculum_odds(curriculum: str | list[float], num_buckets: int) -> list[float]:
    """Odds per bucket, shortest first, for a curriculum name or a custom list.

    Names generalise to any number of buckets n: uniform = n ones, grow_linear = n..1,
    grow_p2 = 2^(n-1)..1.
    """
    n = int(num_buckets)
    if isinstance(curriculum, str):
        if curriculum == "uniform":
            return [1.0] * n
        if curriculum == "grow_linear":
            return [float(n - i) for i in range(n)]
        if curriculum == "grow_p2":
            return [float(2 ** (n - 1 - i)) for i in range(n)]
        raise ValueError(f"curriculum {curriculum!r} is not one of {sorted(CURRICULA)} or a "
                         "list of odds per bucket, shortest first")
    odds = [float(x) for x in curriculum]
    if len(odds) != n or any(not np.isfinite(x) or x < 0 for x in odds) or not any(odds):
        raise ValueError(f"curriculum odds {odds} must be {n} finite non-negative numbers (one "
                         "per bucket, shortest first), not all zero")
    return odds


@dataclass(frozen=True)
class Schedule:
    """Per step: the bucket, where its pieces come from. All int64 [num_steps]."""

    bucket: np.ndarray  # k of the step
    epoch: np.ndarray  # epoch of the step (piece order and draws are per epoch)
    cycle: np.ndarray  # cycle within the epoch
    offset: np.ndarray  # index of the step's first piece in the epoch's order of bucket k


def _parts(n: int, cycles: int) -> np.ndarray:
    """Start of each cycle's part of n pieces: int64 [cycles + 1], parts differ by <= 1."""
    sizes = np.full(cycles, n // cycles, dtype=np.int64)
    sizes[: n % cycles] += 1
    return np.concatenate([[0], np.cumsum(sizes)])


def plan_schedule(bucket_pieces: dict[int, int], max_log2: int, base_batch: int,
                  num_steps: int, *, odds: list[float], rule: str = "paper", cycles: int = 1,
                  seed: int = 0) -> Schedule:
    """The full schedule of ``num_steps`` steps; see :func:`bucket_schedule`."""
    ks = sorted(int(k) for k in bucket_pieces)
    if rule not in RULES:
        raise ValueError(f"curriculum rule {rule!r} is not one of {list(RULES)}")
    if base_batch < 1 or cycles < 1 or num_steps < 0 or seed < 0:
        raise ValueError(f"need base_batch >= 1, cycles >= 1, num_steps >= 0, seed >= 0; got "
                         f"{base_batch}, {cycles}, {num_steps}, {seed}")
    if not ks or ks[-1] > max_log2:
        raise ValueError(f"buckets {ks} must be non-empty and at most max_log2={max_log2}")
    odds_arr = np.asarray(curriculum_odds(list(odds), len(ks)), dtype=np.float64)
    n = np.array([int(bucket_pieces[k]) for k in ks], dtype=np.int64)
    batch = np.array([base_batch << (max_log2 - k) for k in ks], dtype=np.int64)
    targets = np.array([1 << k for k in ks], dtype=np.float64)
    parts = [_parts(int(x), cycles) for x in n]  # per bucket: int64 [cycles + 1]
    # The smallest part is the last cycle's: every cycle must be able to draw something.
    last = np.array([p[-1] - p[-2] for p in parts])
    if not np.any((last >= batch) & (odds_arr > 0)):
        raise ValueError(
            f"no bucket with non-zero odds holds a full batch per cycle: pieces "
            f"{dict(zip(ks, n.tolist()))} / cycles={cycles} vs batch 2^(max-k) x base_batch="
            f"{dict(zip(ks, batch.tolist()))}; "
            "lower base_batch (tokens per step) or cycles, or decompose more data")
    out = np.empty((4, num_steps), dtype=np.int64)
    step, epoch = 0, 0
    while step < num_steps:
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), epoch, 0]))
        for c in range(cycles):
            used = np.zeros(len(ks), dtype=np.int64)
            left = np.array([p[c + 1] - p[c] for p in parts], dtype=np.int64)
            while step < num_steps:
                ok = (left - used >= batch) & (odds_arr > 0)
                if not ok.any():
                    break
                w = odds_arr * ok
                if rule == "released":
                    w = w * (left - used) * targets
                cum = np.cumsum(w)
                i = int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))
                if i >= len(ks) or not ok[i]:  # float rounding at the top end
                    i = int(np.flatnonzero(ok)[-1])
                out[:, step] = (ks[i], epoch, c, parts[i][c] + used[i])
                used[i] += batch[i]
                step += 1
        epoch += 1
    return Schedule(*out)


def bucket_schedule(bucket_pieces: dict[int, int], max_log2: int, base_batch: int,
                    num_steps: int, *, odds: list[float], rule: str = "paper", cycles: int = 1,
                    seed: int = 0) -> list[int]:
    """The bucket k of every step 0..num_steps-1, deterministic from ``seed``.

    Args:
        bucket_pieces: {k: pieces of 2^k + 1 tokens}, e.g. ``bucket_pieces(manifest)``.
        base_batch: streams per step; bucket k's batch is 2^(max_log2 - k) x base_batch pieces.
        odds: one per bucket, shortest first (see :func:`curriculum_odds`).
        rule: ``"paper"`` (odds over buckets with a full batch left in the cycle) or
            ``"released"`` (odds x share of the cycle's remaining targets).
    A prefix of the schedule does not depend on ``num_steps``.
    """
    return plan_schedule(bucket_pieces, max_log2, base_batch, num_steps, odds=odds, rule=rule,
                         cycles=cycles, seed=seed).bucket.tolist()


class DecomposedBatches:
    """Random-access steps over the output of ``seqpar data decompose``.

    Args:
        manifest_dir: the decomposition directory (validated by ``load_manifest``).
        base_batch: streams per step, each ``2^max`` targets.
        curriculum: a name of ``CURRICULA`` or odds per bucket, shortest first.
        num_steps: steps to plan; ``step`` must lie in [0, num_steps).
    """

    def __init__(self, manifest_dir: str, *, base_batch: int,
                 curriculum: str | list[float] = "grow_p2", rule: str = "paper",
                 cycles: int = 1, seed: int = 0, num_steps: int) -> None:
        from seqpar.data.decompose import bucket_pieces, bucket_prefix, load_manifest
        from seqpar.data.store import TokenStore

        self.manifest = load_manifest(manifest_dir)
        self.pieces = bucket_pieces(self.manifest)
        self.max_log2 = int(self.manifest["settings"]["max_log2"])
        self.base_batch, self.rule, self.cycles = int(base_batch), rule, int(cycles)
        self.seed, self.num_steps = int(seed), int(num_steps)
        self.curriculum = curriculum if isinstance(curriculum, str) else "custom"
        self.odds = curriculum_odds(curriculum, len(self.pieces))
        self.schedule = plan_schedule(self.pieces, self.max_log2, self.base_batch,
                                      self.num_steps, odds=self.odds, rule=rule,
                                      cycles=self.cycles, seed=self.seed)
        self.stores = {k: TokenStore(bucket_prefix(manifest_dir, k))
                       for k, n in self.pieces.items() if n}  # empty buckets have no files
        self._perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def _check(self, step: int) -> int:
        step = int(step)
        if not 0 <= step < self.num_steps:
            raise IndexError(f"step {step} is outside [0, num_steps={self.num_steps}); "
                             "construct DecomposedBatches with a larger num_steps")
        return step

    def step_bucket(self, step: int) -> int:
        """The bucket k of ``step``: its pieces have 2^k + 1 tokens."""
        return int(self.schedule.bucket[self._check(step)])

    def _order(self, epoch: int, k: int) -> np.ndarray:
        key = (epoch, k)
        perm = self._perms.get(key)
        if perm is None:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, 1, k]))
            perm = self._perms[key] = rng.permutation(self.pieces[k])
            while len(self._perms) > _KEEP_PERMS:
                self._perms.popitem(last=False)
        self._perms.move_to_end(key)
        return perm

    def step_piece_ids(self, step: int) -> np.ndarray:
        """Piece indices (documents of bucket k's store) of ``step``: int64 [2^(max-k) * base]."""
        step = self._check(step)
        k, epoch = int(self.schedule.bucket[step]), int(self.schedule.epoch[step])
        lo = int(self.schedule.offset[step])
        return self._order(epoch, k)[lo: lo + (self.base_batch << (self.max_log2 - k))]

    by_step = True

    def step_streams(self, step: int, first: int = 0, stop: int | None = None) -> list[Stream]:
        """Streams ``first:stop`` (default all ``base_batch``) of ``step``; each is 2^(max-k) whole
        pieces of bucket k. Only those streams' tokens are read.

        Stream: tokens int64 [2^(max-k) * (2^k + 1)], cu_seqlens int32 marking every piece as
        its own document, so each stream has exactly 2^max targets.
        """
        k = self.step_bucket(step)
        ids = self.step_piece_ids(step)
        store, size, per = self.stores[k], (1 << k) + 1, 1 << (self.max_log2 - k)
        cu = np.arange(per + 1, dtype=np.int32) * size
        out = []
        for b in range(first, self.base_batch if stop is None else min(stop, self.base_batch)):
            tokens = np.concatenate([store.doc(int(i)) for i in ids[b * per:(b + 1) * per]])
            out.append(Stream(tokens=tokens.astype(np.int64), cu_seqlens=cu.copy()))
        return out

    def rank_streams(self, step: int, dp_rank: int, dp: int) -> list[Stream]:
        """dp rank ``dp_rank``'s share of ``step``'s streams (``base_batch`` must split over ``dp``)."""
        per = self.base_batch // dp
        return self.step_streams(step, dp_rank * per, (dp_rank + 1) * per)

    def describe(self) -> str:
        """One line: buckets, curriculum, per-step size, and the bucket mix of the planned steps."""
        ks = sorted(self.pieces)
        counts = np.bincount(np.searchsorted(ks, self.schedule.bucket), minlength=len(ks))
        mix = " ".join(f"{k}:{c}" for k, c in zip(ks, counts.tolist()))
        epochs = int(self.schedule.epoch[-1]) + 1 if self.num_steps else 0
        return (f"decompose buckets 2^{ks[0]}..2^{ks[-1]} "
                f"({sum(self.pieces.values()):,} pieces), curriculum {self.curriculum} "
                f"{[round(x, 3) for x in self.odds]} rule={self.rule} cycles={self.cycles} "
                f"seed={self.seed}: {self.base_batch} x 2^{self.max_log2} targets per step; "
                f"{self.num_steps} steps over {epochs} epoch(s), steps per bucket {mix}")
