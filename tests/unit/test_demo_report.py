"""The demo's closing table and sentence: intervals printed, "beats" only where the paired interval says so."""

from rich.console import Console

from tunelab.demo import METRICS, results_table, verdict_line


def _ev(diff_lo: float, diff_hi: float, base: float = 0.12, tuned: float = 0.42) -> dict:
    def model(v):
        m = {k: v for k, _ in METRICS}
        m["ci"] = {k: [v - 0.02, v + 0.02] for k, _ in METRICS}
        return m

    return {"models": {"base": model(base), "tuned": model(tuned)},
            "differences": {k: {"difference": tuned - base, "ci_low": diff_lo, "ci_high": diff_hi} for k, _ in METRICS}}


def test_table_prints_intervals_of_each_model_and_of_the_change():
    con = Console(width=160, record=True)
    con.print(results_table(_ev(0.28, 0.32), "demo"))
    text = con.export_text()
    assert "0.4200" in text and "[0.400, 0.440]" in text
    assert "0.1200" in text and "[0.100, 0.140]" in text
    assert "+0.3000" in text and "[+0.280, +0.320]" in text


def test_table_fits_an_80_column_log_without_breaking_numbers():
    con = Console(width=80, record=True)
    con.print(results_table(_ev(0.28, 0.32), "demo"))
    text = con.export_text()
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "[+0.280, +0.320]" in text and "[0.400, 0.440]" in text  # no interval split across lines


def test_verdict_follows_the_paired_interval_not_the_point_estimates():
    assert verdict_line(_ev(0.28, 0.32)).startswith("The tuned model beats the base")
    # higher point estimate, but the interval includes 0: no claim
    assert "does NOT beat" in verdict_line(_ev(-0.01, 0.05, tuned=0.14))
    assert "WORSE" in verdict_line(_ev(-0.09, -0.01, base=0.3, tuned=0.25))


def test_verdict_without_differences_falls_back_to_the_point_estimates():
    ev = _ev(0.0, 0.0)
    ev["differences"] = {}
    assert "beats" in verdict_line(ev) and "CI" not in verdict_line(ev)
