"""`seqpar bench scale`'s search and table, without processes (the bench itself is a torchrun job)."""

import pytest

from seqpar.bench.scale_bench import ScaleRow, _search, format_table, model_config, run_scale_bench


@pytest.mark.parametrize("limit,start", [(1000, 100), (1000, 5000), (1000, 1000), (37, 8), (4096, 4096)])
def test_search_brackets_then_bisects_to_the_resolution(limit, start):
    tried = []

    def fits(n):
        tried.append(n)
        return n <= limit, n

    good, peak, bad, trials = _search(fits, start, world=2, resolution=0.02)
    assert trials == len(tried) and all(n % 4 == 0 for n in tried)  # multiples of 2 x world
    assert good <= limit and peak == good and good == max(n for n in tried if n <= limit)
    if trials < 12:  # converged: the limit is bracketed to 2% (or one unit)
        assert bad > limit and bad - good <= max(4, 0.02 * good)


def test_search_reports_nothing_fits():
    good, peak, bad, _ = _search(lambda n: (False, n), 64, world=2, resolution=0.02)
    assert (good, peak) == (0, 0) and bad == 4


def test_table_has_the_ratio_to_none():
    cfg = model_config("256,8,8,4", 512)
    rows = [ScaleRow("none", 1000, 100 * 2**20, 1016, 990, 5), ScaleRow("memo", 5000, 150 * 2**20, 5104, 5200, 7)]
    table = format_table(rows, cfg, 4, 160 * 2**20, 0.0)
    assert "ring sp=4" in table and "dim 256, 8 layers, 8/4 heads, budget 160 MiB" in table
    memo = next(line for line in table.splitlines() if line.startswith("memo"))
    assert memo.split()[:3] == ["memo", "5,000", "5.00"]


def test_bad_policy_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="--policies: 'memo2' is not one of"):
        run_scale_bench("64,2,2,1", 512, 2, 100, ["memo2"], 0.0, str(tmp_path / "x.json"))
