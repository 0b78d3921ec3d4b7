"""Bytes sent per rank by ring, Ulysses and hybrid attention equal the spec's formulas, exactly.

Spec (specs/sequence-parallel.md), T tokens, P ranks, h heads, h_kv KV heads, d head dim, b bytes
per element (4 fp32, 2 bf16):
- ring forward  (P-1) * 2 * (T/P) * h_kv * d * b                       ("ring_fwd_kv")
- ring backward (P-1) * 2 * (T/P) * h_kv * d * (b + 4)                 ("ring_bwd_kv" + "ring_bwd_acc")
- Ulysses forward and backward each (T/P) * (2h + 2h'_kv) * d * b * (P-1)/P   ("ulysses_a2a"),
  h'_kv = h_kv if P divides it, else P (KV heads replicated inside the exchange).
- hybrid: Ulysses over the inner U ranks, ring over the outer R on the gathered tokens, whose
  KV heads per rank are h'_kv / U.

With uneven shards the same accounting is applied to the actual per-rank token counts: a ring
rank forwards every block except the one its successor owns, so it sends 2 * T_block * h_kv * d * b
for each of those P-1 blocks; an all-to-all sends everything but the rows the rank keeps.

All cases of one world size run in one call of that world's pool (tests/support/dist.py); the
transports are wrapped in the workers, so the counters are also checked against what was
actually handed to ``batch_isend_irecv`` and ``all_to_all_single``.

Run: python -m pytest tests/attention/test_comm_bytes.py -q
"""

from __future__ import annotations

import numpy as np
import pytest

from seqpar.attention.layout import build_layout
from tests.attention.bytes_cases import ByteCase, run_byte_cases

WORLDS = (2, 4, 8)
RING_OPS = ("ring_fwd_kv", "ring_bwd_kv", "ring_bwd_acc")
ACC_BYTES = 4  # the travelling dK/dV accumulators are fp32


def _cases(world: int) -> list[ByteCase]:
    even = (2 * world * 6,)  # one document of 2P*k tokens: every shard holds T/P tokens
    cases = [
        # ring: MHA and GQA, fp32 and bf16, even and uneven, zero-token ranks, full attention
        ByteCase("ring", even, 8, 8, dtype="float32"),
        ByteCase("ring", even, 8, 2, dtype="bfloat16"),
        ByteCase("ring", (17, 31, 11), 8, 2, dtype="float32"),
        ByteCase("ring", (100, 37, 5), 4, 4, dtype="bfloat16"),
        ByteCase("ring", (17, 31, 11), 4, 1, dtype="float32", layout="contiguous", causal=False),
        ByteCase("ring", (3,), 4, 2, dtype="float32"),  # most ranks hold nothing
        ByteCase("ring", (17, 31, 11), 8, 2, dtype="bfloat16", return_lse=True),
        # Ulysses (contiguous layout): MHA, GQA split (P | h_kv) and replicated (h_kv | P)
        ByteCase("ulysses", even, 8, 8, dtype="float32", layout="contiguous"),
        ByteCase("ulysses", even, 8, 2, dtype="float32", layout="contiguous"),
        ByteCase("ulysses", even, 8, 1, dtype="bfloat16", layout="contiguous"),
        ByteCase("ulysses", even, 8, 4, dtype="bfloat16", layout="contiguous"),
        ByteCase("ulysses", (17, 31, 11), 8, 2, dtype="float32", layout="contiguous"),
        ByteCase("ulysses", (17, 31, 11), 8, 8, dtype="bfloat16", layout="zigzag"),
        ByteCase("ulysses", (3,), 8, 2, dtype="float32", layout="contiguous"),
        ByteCase("ulysses", (17, 31, 11), 8, 2, dtype="bfloat16", layout="contiguous", return_lse=True),
    ]
    for u in (2, 4):
        if world % u or world // u < 2:
            continue
        cases += [
            ByteCase("hybrid", even, 8, 8, dtype="float32", ulysses=u),
            ByteCase("hybrid", even, 8, 1, dtype="bfloat16", ulysses=u),
            ByteCase("hybrid", even, 8, 2, dtype="bfloat16", ulysses=u),
            ByteCase("hybrid", (17, 31, 11), 8, 2, dtype="float32", ulysses=u),
            ByteCase("hybrid", (100, 37, 5), 8, 8, dtype="bfloat16", ulysses=u, layout="contiguous"),
            ByteCase("hybrid", (17, 31, 11), 8, 2, dtype="bfloat16", ulysses=u, return_lse=True),
        ]
    return cases


CASES = {w: _cases(w) for w in WORLDS}


def _cu(seqlens) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(seqlens)]).astype(np.int32)


def _b(case: ByteCase) -> int:
    return {"float32": 4, "bfloat16": 2}[case.dtype]


def _kv_exchanged(kv_heads: int, p: int) -> int:
    """h'_kv: KV heads entering the all-to-all (replicated up to P when P does not divide h_kv)."""
    if kv_heads % p == 0:
        return kv_heads
    assert p % kv_heads == 0
    return p


# --- expected bytes, from the per-rank token counts ----------------------------------------------


def _ring_bytes(blocks: list[int], rank: int, kv_heads: int, d: int, b: int) -> dict[str, int]:
    """Ring rank ``rank`` forwards blocks rank, rank-1, .., rank-P+2 (all but its successor's), K and
    V each; in the backward it forwards them again plus the fp32 dK/dV accumulators of every block
    but its own (which arrive home after P-1 hops)."""
    p = len(blocks)
    fwd = sum(2 * blocks[(rank - s) % p] * kv_heads * d * b for s in range(p - 1))
    acc = sum(2 * blocks[(rank - s) % p] * kv_heads * d * ACC_BYTES for s in range(1, p))
    return {"ring_fwd_kv": fwd, "ring_bwd_kv": fwd, "ring_bwd_acc": acc}


def _ulysses_bytes(counts: list[int], rank: int, heads: int, kv_heads: int, d: int, b: int) -> dict[str, int]:
    """Forward: q, k, v leave as (P-1)/P of this rank's tokens (their other ranks' head slices);
    out comes back as the other ranks' tokens of this rank's head slice. Backward: the reverse."""
    p = len(counts)
    t, total = counts[rank], sum(counts)
    hkv = _kv_exchanged(kv_heads, p)
    to_heads = lambda h: t * (h // p) * (p - 1) * d * b  # noqa: E731 - seq -> head
    to_seq = lambda h: (total - t) * (h // p) * d * b  # noqa: E731 - head -> seq
    fwd = to_heads(heads) + 2 * to_heads(hkv) + to_seq(heads)
    bwd = to_heads(heads) + to_seq(heads) + 2 * to_seq(hkv)
    return {"fwd": fwd, "bwd": bwd}


def _lse_bytes(counts: list[int], rank: int, heads: int) -> int:
    """return_lse under Ulysses: fp32 lse [h/P, T] goes back to the token layout like out (head_dim 1)."""
    p = len(counts)
    return (sum(counts) - counts[rank]) * (heads // p) * 4


def _expected(case: ByteCase, world: int) -> list[dict[str, dict[str, int]]]:
    """Per SP rank: {"fwd": {op: bytes}, "bwd": {op: bytes}}; "lse" is the lse exchange when requested
    (the spec's formulas cover q, k, v and out; it names no op for lse, see :func:`_fold_lse`)."""
    u, r = case.degrees(world)
    layout = build_layout(_cu(case.seqlens), case.layout, ulysses=u, ring=r)
    counts = layout.counts()
    d, b = case.head_dim, _b(case)
    out = []
    for s in range(world):
        if case.algo == "ring":
            ring = _ring_bytes(counts, s, case.kv_heads, d, b)
            out.append({"fwd": {"ring_fwd_kv": ring["ring_fwd_kv"]}, "bwd": {k: ring[k] for k in RING_OPS[1:]}})
        elif case.algo == "ulysses":
            uly = _ulysses_bytes(counts, s, case.heads, case.kv_heads, d, b)
            out.append({"fwd": {"ulysses_a2a": uly["fwd"]}, "bwd": {"ulysses_a2a": uly["bwd"]}})
            if case.return_lse:
                out[-1]["fwd"]["lse"] = _lse_bytes(counts, s, case.heads)
        else:
            j, i = divmod(s, u)  # SP rank = ring_index * U + ulysses_index
            inner = counts[j * u : (j + 1) * u]
            blocks = [sum(counts[x * u : (x + 1) * u]) for x in range(r)]
            uly = _ulysses_bytes(inner, i, case.heads, case.kv_heads, d, b)
            ring = _ring_bytes(blocks, j, _kv_exchanged(case.kv_heads, u) // u, d, b)
            out.append(
                {
                    "fwd": {"ulysses_a2a": uly["fwd"], "ring_fwd_kv": ring["ring_fwd_kv"]},
                    "bwd": {"ulysses_a2a": uly["bwd"], "ring_bwd_kv": ring["ring_bwd_kv"], "ring_bwd_acc": ring["ring_bwd_acc"]},
                }
            )
            if case.return_lse:
                out[-1]["fwd"]["lse"] = _lse_bytes(inner, i, case.heads)
    return out


def _spec_closed_form(case: ByteCase, world: int) -> dict[str, dict[str, int]]:
    """The spec's formulas verbatim, for even shards (T divisible by every degree)."""
    t = sum(case.seqlens)
    d, b, h, hkv = case.head_dim, _b(case), case.heads, case.kv_heads
    u, r = case.degrees(world)

    def ring(p: int, kv: int, tokens: int) -> dict[str, int]:
        return {
            "ring_fwd_kv": (p - 1) * 2 * (tokens // p) * kv * d * b,
            "ring_bwd": (p - 1) * 2 * (tokens // p) * kv * d * (b + 4),
        }

    def ulysses(p: int, tokens: int) -> int:
        hkv_x = max(hkv, p)  # h'_kv
        num = (tokens // p) * (2 * h + 2 * hkv_x) * d * b * (p - 1)
        assert num % p == 0
        return num // p

    if case.algo == "ring":
        x = ring(world, hkv, t)
        return {"fwd": {"ring_fwd_kv": x["ring_fwd_kv"]}, "bwd": {"ring": x["ring_bwd"]}}
    if case.algo == "ulysses":
        return {"fwd": {"ulysses_a2a": ulysses(world, t)}, "bwd": {"ulysses_a2a": ulysses(world, t)}}
    # hybrid: Ulysses over a ring block's T/R tokens, then ring over R blocks with h'_kv/U KV heads
    x = ring(r, max(hkv, u) // u, t)
    a2a = ulysses(u, t // r)
    return {"fwd": {"ulysses_a2a": a2a, "ring_fwd_kv": x["ring_fwd_kv"]}, "bwd": {"ulysses_a2a": a2a, "ring": x["ring_bwd"]}}


# --- measurement: one pool call per world size ----------------------------------------------------


@pytest.fixture(scope="module")
def measured(dist_pool):
    """world -> per-rank results of every case of that world (measured once, lazily)."""
    cache: dict[int, list] = {}

    def get(world: int) -> list[list[dict]]:
        if world not in cache:
            try:
                # transport=True: the workers also count what reaches batch_isend_irecv / all_to_all_single
                per_rank = dist_pool(world).run(run_byte_cases, CASES[world], True, timeout_s=240)
                cache[world] = [[per_rank[rank][i] for rank in range(world)] for i in range(len(CASES[world]))]
            except Exception as exc:  # one failure reported by every test of that world
                cache[world] = exc
        if isinstance(cache[world], Exception):
            raise cache[world]
        return cache[world]

    return get


def _by_sp_rank(results: list[dict], case: ByteCase) -> list[dict]:
    errors = [r["error"] for r in results if "error" in r]
    assert not errors, f"{case.name()} raised:\n{errors[0]}"
    by = {r["sp_rank"]: r for r in results}
    assert sorted(by) == list(range(len(results)))
    return [by[s] for s in range(len(results))]


def _nonzero(bytes_by_op: dict[str, int]) -> dict[str, int]:
    return {op: n for op, n in bytes_by_op.items() if n}


def _fold_lse(case: ByteCase, bytes_by_op: dict[str, int]) -> dict[str, int]:
    """With return_lse, compare the Ulysses exchanges and the lse exchange as one sum, whatever op
    name the lse exchange is counted under; ring ops stay exact."""
    if not case.return_lse:
        return _nonzero(bytes_by_op)
    out = {op: n for op, n in bytes_by_op.items() if op in RING_OPS and n}
    out["a2a incl. lse"] = sum(n for op, n in bytes_by_op.items() if op not in RING_OPS)
    return _nonzero(out)


PARAMS = [pytest.param(w, i, id=f"P{w}-{c.name()}") for w in WORLDS for i, c in enumerate(CASES[w])]


@pytest.mark.parametrize("world,index", PARAMS)
def test_counters_equal_formula(measured, world, index):
    case = CASES[world][index]
    results = _by_sp_rank(measured(world)[index], case)
    expected = _expected(case, world)
    u, r = case.degrees(world)
    counts = build_layout(_cu(case.seqlens), case.layout, ulysses=u, ring=r).counts()
    assert [x["tokens"] for x in results] == counts
    for s, (got, want) in enumerate(zip(results, expected)):
        for phase in ("fwd", "bwd"):
            assert _fold_lse(case, got[phase]) == _fold_lse(case, want[phase]), (
                f"{case.name()}, P={world}, SP rank {s} ({counts[s]} tokens, counts {counts}), {phase}: "
                f"counted {dict(got[phase])}, formula {want[phase]}"
            )
    if len(set(counts)) == 1 and not case.return_lse:  # even shards: the spec's closed forms, verbatim
        spec = _spec_closed_form(case, world)
        for s, got in enumerate(results):
            bwd = dict(got["bwd"])
            ring_bwd = bwd.pop("ring_bwd_kv", 0) + bwd.pop("ring_bwd_acc", 0)
            bwd["ring"] = ring_bwd
            assert _nonzero(got["fwd"]) == _nonzero(spec["fwd"]), (case.name(), s, got["fwd"], spec["fwd"])
            assert _nonzero(bwd) == _nonzero(spec["bwd"]), (case.name(), s, got["bwd"], spec["bwd"])


@pytest.mark.parametrize("world", WORLDS)
def test_counters_equal_bytes_handed_to_transport(measured, world):
    """Cross-check: the counters equal the bytes of the isend ops given to batch_isend_irecv and the
    non-local part of the inputs given to all_to_all_single (wrapped in the workers)."""
    checked = 0
    for case, results in zip(CASES[world], measured(world)):
        for s, got in enumerate(_by_sp_rank(results, case)):
            for phase in ("fwd", "bwd"):
                counters = got[phase]
                transport = got[f"{phase}_transport"]
                p2p = sum(n for op, n in counters.items() if op in RING_OPS)
                a2a = sum(n for op, n in counters.items() if op not in RING_OPS)
                assert (p2p, a2a) == (transport["p2p"], transport["a2a"]), (
                    f"{case.name()}, P={world}, SP rank {s}, {phase}: counters p2p={p2p} a2a={a2a}, "
                    f"transport p2p={transport['p2p']} a2a={transport['a2a']}"
                )
                if not case.return_lse:
                    assert set(counters) <= {*RING_OPS, "ulysses_a2a"}, counters
                checked += transport["p2p"] + transport["a2a"]
    assert checked > 0


def test_formulas_are_not_vacuous():
    """The expected values themselves scale as the spec says (guards the helpers above)."""
    even = ByteCase("ring", (64,), 8, 2, dtype="bfloat16")
    ring = _expected(even, 4)[0]
    assert ring["fwd"]["ring_fwd_kv"] == 3 * 2 * 16 * 2 * 8 * 2
    assert ring["bwd"]["ring_bwd_kv"] + ring["bwd"]["ring_bwd_acc"] == 3 * 2 * 16 * 2 * 8 * (2 + 4)
    uly = _expected(ByteCase("ulysses", (64,), 8, 1, dtype="float32", layout="contiguous"), 4)[0]
    assert uly["fwd"]["ulysses_a2a"] == 16 * (2 * 8 + 2 * 4) * 8 * 4 * 3 // 4  # h'_kv = P = 4
