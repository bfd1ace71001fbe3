"""Frontier, recommendation and predictor rank correlation on hand-made points; the plot and markdown renderers."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest

from lora_tools.compare.frontier import (
    NoVariantMeetsError,
    average_ranks,
    finalize,
    frontier,
    pareto_flags,
    predictor_analysis,
    recommend,
    spearman,
)
from lora_tools.errors import InvalidOptionError, OutputExistsError
from lora_tools.report.end_to_end_md import render_end_to_end
from lora_tools.report.frontier_plot import plot_frontier


def row(label: str, size: int, kl: float, method: str = "svd", **extra: Any) -> dict[str, Any]:
    return {"label": label, "method": method, "rank": None, "scheme": None, "bytes": size, "kl_mean": kl,
            "kl_p99": kl * 3, "top1": 1 - kl, "ppl": 10 + kl, "effect_kept": 1 - kl / 0.5, **extra}


def brute_pareto(points: list[tuple[float, float]]) -> list[bool]:
    flags = []
    for i, (s, v) in enumerate(points):
        ok = math.isfinite(v)
        for j, (s2, v2) in enumerate(points):
            if j != i and math.isfinite(v2) and (s2 < s and v2 <= v or s2 <= s and v2 < v):
                ok = False
        flags.append(ok)
    return flags


def test_pareto_flags_with_ties_and_nan() -> None:
    points = [(100, 0.5), (200, 0.1), (200, 0.1), (150, 0.5), (300, 0.1), (50, float("nan")), (400, 0.0),
              (100, 0.6)]
    assert pareto_flags(points) == [True, True, True, False, False, False, True, False]
    rng = random.Random(0)
    for _ in range(200):  # against an independent double loop, with many ties
        pts = [(rng.randint(1, 6), rng.choice([0.1, 0.2, 0.3, float("nan")])) for _ in range(rng.randint(1, 9))]
        assert pareto_flags(pts) == brute_pareto(pts)
    rows = [row("a", 100, 0.5), row("b", 200, 0.1), row("c", 150, 0.5), row("d", 400, 0.0, "identity")]
    assert [r["label"] for r in frontier(rows)] == ["a", "b", "d"]


def test_recommendation_max_kl_and_budget_with_ties() -> None:
    rows = [row("identity", 1000, 0.0, "identity"), row("r1", 100, 0.3), row("r2", 200, 0.1),
            row("q8", 200, 0.05, "quant"), row("q8b", 200, 0.05, "quant"), row("q4", 120, 0.1, "quant")]
    pick = recommend(rows, max_kl=0.1)
    assert (pick["criterion"], pick["limit"], pick["label"]) == ("max_kl", 0.1, "q4")  # fewest bytes within
    assert recommend(rows, max_kl=0.05)["label"] == "q8"  # equal bytes and KL: the first listed
    assert recommend(rows, budget=200)["label"] == "q8"  # smallest KL within; tie -> first listed
    assert recommend(rows, budget=150)["label"] == "q4"
    assert recommend(rows, budget=119)["label"] == "r1"
    assert recommend(rows, budget=10_000)["label"] == "q8"  # the adapter itself is never recommended
    for key in ("bytes", "kl_mean", "method", "effect_kept"):
        assert key in pick


def test_nothing_meets_names_the_closest() -> None:
    rows = [row("identity", 1000, 0.0, "identity"), row("r1", 100, 0.3), row("q8", 200, 0.05, "quant")]
    with pytest.raises(NoVariantMeetsError, match=r"--max-kl 0\.01: .*closest is q8 \(mean KL 0\.05, 200 bytes"):
        recommend(rows, max_kl=0.01)
    with pytest.raises(NoVariantMeetsError, match=r"--budget 50 bytes: .*smallest is r1 .*100 bytes"):
        recommend(rows, budget=50)
    with pytest.raises(NoVariantMeetsError, match="closest is q8"):
        recommend(rows, max_kl=0.0)  # the adapter itself (KL 0) does not count
    with pytest.raises(InvalidOptionError, match="not both"):
        recommend(rows, max_kl=0.1, budget=100)
    with pytest.raises(InvalidOptionError, match="max-kl"):
        recommend(rows, max_kl=-1)
    with pytest.raises(InvalidOptionError, match="budget"):
        recommend(rows, budget=0)


def test_default_recommendation_keeps_95_percent_of_the_effect() -> None:
    rows = [row("r1", 100, 0.3), row("r2", 200, 0.02), row("q8", 300, 0.001, "quant")]
    pick = recommend(rows, kl_adapter_base=0.5)  # within 0.05·0.5 = 0.025
    assert (pick["criterion"], pick["limit"], pick["label"]) == ("effect_kept", 0.95, "r2")
    none = recommend(rows, kl_adapter_base=0.001)
    assert none["label"] is None and "closest is q8" in none["note"]


def brute_spearman(x: list[float], y: list[float]) -> float:
    """Ranks by counting (ties averaged), then Pearson by its definition."""
    def ranks(v: list[float]) -> list[float]:
        return [sum(1 for b in v if b < a) + (sum(1 for b in v if b == a) + 1) / 2 for a in v]

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def test_spearman_against_brute_force() -> None:
    assert average_ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # the textbook no-ties formula 1 − 6Σd²/(n(n²−1))
    x, y = [1, 2, 3, 4, 5], [2, 1, 4, 3, 5]
    assert spearman(x, y) == pytest.approx(1 - 6 * 4 / (5 * 24))
    rng = random.Random(1)
    for _ in range(300):
        n = rng.randint(3, 12)
        xs = [rng.choice([0.1, 0.2, 0.3, 0.4]) for _ in range(n)]
        ys = [rng.choice([1.0, 2.0, 3.0]) for _ in range(n)]
        expected = None if len(set(xs)) == 1 or len(set(ys)) == 1 else brute_spearman(xs, ys)
        got = spearman(xs, ys)
        assert (got is None) == (expected is None)
        if expected is not None:
            assert got == pytest.approx(expected, abs=1e-12)
    assert spearman([1, 2], [1, 2]) is None  # too few points to say anything
    assert spearman([1, 2, 3, None, float("nan")], [3, 2, 1, 5, 6]) == pytest.approx(-1.0)  # missing pairs dropped
    for perm in itertools.permutations(range(4)):  # symmetric in its arguments
        assert spearman(list(perm), [0, 1, 2, 3]) == spearman([0, 1, 2, 3], list(perm))


def sample_section(metric: str = "kl") -> dict[str, Any]:
    rows = [row("identity", 1000, 0.0, "identity", predicted_weight_rel_error=0.0),
            row("svd-r1", 100, 0.3, rank=1, predicted_weight_rel_error=0.8, predicted_output_rel_error=0.7),
            row("svd-r2", 200, 0.1, rank=2, predicted_weight_rel_error=0.5, predicted_output_rel_error=0.4),
            row("svd-r4", 400, 0.02, rank=4, predicted_weight_rel_error=0.2, predicted_output_rel_error=0.1),
            row("int8-channel", 520, 0.0004, "quant", predicted_weight_rel_error=0.004),
            row("int4-g128", 290, 0.02, "quant", predicted_weight_rel_error=0.09),
            row("int4-channel", 280, 0.03, "quant", predicted_weight_rel_error=0.08)]
    for r in rows:
        r["scheme"] = r["label"] if r["method"] == "quant" else None
        r.setdefault("predicted_output_rel_error", None)
    section = {"metric": metric, "base_ppl": 12.0 if metric == "kl" else None,
               "adapter_ppl": 10.0 if metric == "kl" else None, "kl_adapter_base": 0.5,
               "kl_adapter_base_p99": 1.5, "positions": 300, "sequences": 10, "device": "cpu",
               "forward_dtype": "float32", "variants": rows}
    if metric == "cosine":
        for r in rows:
            r.update(top1=None, ppl=None, cosine_mean=1 - r["kl_mean"], cosine_worst=1 - 2 * r["kl_mean"])
    return section


def test_finalize_and_predictors() -> None:
    section = finalize(sample_section(), max_kl=0.025)
    assert [r["on_frontier"] for r in section["variants"]] == [True, True, True, False, True, True, True]
    assert section["recommendation"]["label"] == "int4-g128"
    predictors = {p["method"]: p for p in section["predictors"]}
    assert set(predictors) == {"svd", "quant", "all"}
    assert predictors["svd"]["spearman_weight"] == pytest.approx(1.0)
    assert predictors["svd"]["spearman_output"] == pytest.approx(1.0)
    assert predictors["quant"]["spearman_weight"] == pytest.approx(0.5)  # the two INT4 schemes swap places
    assert predictors["all"]["variants"] == 6 and predictors["all"]["spearman_output"] == pytest.approx(1.0)
    (empty,) = predictor_analysis([])
    assert (empty["method"], empty["variants"], empty["spearman_weight"], empty["spearman_output"]) == \
        ("all", 0, None, None)
    json.dumps(section, allow_nan=False)  # plain data, no NaN in this section


def test_markdown_section(tmp_path: Path) -> None:
    text = render_end_to_end(finalize(sample_section(), budget=300))
    assert "## End-to-end" in text and "int4-g128" in text
    assert "| label |" in text and "Spearman" in text
    assert "perplexity 10" in text and "effect kept" in text.lower()
    assert "**recommended**" in text or "Recommended" in text
    frontier_part = text.split("### All variants")[0]
    assert "svd-r4" not in frontier_part.split("### Rank")[1]  # dominated: only in the full table
    cosine = render_end_to_end(finalize(sample_section("cosine")))
    assert "1 − cos" in cosine and "cosine" in cosine and "perplexity" not in cosine.split("###")[0]


def test_plot_is_written_atomically(tmp_path: Path) -> None:
    section = finalize(sample_section(), max_kl=0.025)
    out = tmp_path / "frontier.png"
    plot_frontier(section, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(OutputExistsError):
        plot_frontier(section, out)
    plot_frontier(finalize(sample_section("cosine")), out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frontier.png"]  # no temporary left behind
