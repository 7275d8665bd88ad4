"""The benchmark suite: runs written with their provenance, gates and timings; one summary per source."""

import json

import numpy as np
import pandas as pd
import pytest

import scdoloris as sd
from scdoloris.benchmark import _suite as suite

TINY = suite.RunSettings(max_steps=12, batch_size=32, n_cells=20)


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory):
    """The synthetic doubles split run at a development and a confirmation seed, with tiny models."""
    out = tmp_path_factory.mktemp("suite")
    made = suite.run_suite(["synthetic_doubles"], [0, 10], out, TINY, progress=False)
    assert len(made) == 2
    return out


def test_runs_record_scores_gates_timings_and_provenance(suite_dir):
    run = suite.run_directory(suite_dir, "synthetic_doubles", 0)
    meta = json.loads((run / "meta.json").read_text())
    assert meta["source"] == suite.source_fingerprint() and meta["seed"] == 0
    assert meta["settings"]["max_steps"] == 12 and meta["n_conditions"] == 6
    scores = pd.read_csv(run / "scores.csv.gz")
    assert {"doloris", "anchor", "doloris_paper", "no_change"} <= set(scores["method"])
    gates = pd.read_csv(run / "gates.csv")
    # One row per held-out condition of the default, with its kind, gate and calibration size.
    assert set(gates["method"]) == {"doloris"} and len(gates) == 6
    assert {"kind", "gate", "n_calibration"} <= set(gates.columns)
    assert gates["gate"].between(0, 1).all()
    timings = pd.read_csv(run / "timings.csv")
    assert (timings.set_index("method")["fit_seconds"] > 0).all()


def test_finished_runs_are_not_redone(suite_dir):
    assert suite.run_suite(["synthetic_doubles"], [0, 10], suite_dir, TINY, progress=False) == []
    other = suite.RunSettings(max_steps=13, batch_size=32, n_cells=20, methods=("anchor",))
    # Other settings are other runs (only the cheap baseline here).
    made = suite.run_suite(["synthetic_doubles"], [0], suite_dir / "other", other, progress=False)
    assert len(made) == 1


def test_summary_has_the_anchor_and_the_paired_difference(suite_dir):
    text = suite.summarize(suite_dir)
    assert (suite_dir / "summary.md").read_text() == text
    assert "| doloris | anchor | doloris − anchor (± s.e.) |" in text
    rows = [line for line in text.splitlines() if line.startswith("| synthetic (effect 2)")]
    assert any("| development 0 |" in row for row in rows) and any("| confirmation 10 |" in row for row in rows)
    # The paired difference printed is the one computed from the scores.
    runs = suite.read_runs(suite_dir)
    scores = runs.scores[runs.scores["seed"] == 0]
    mean, se, n = sd.benchmark.paired_difference(scores, "doloris", "anchor")
    assert n == 6
    first = next(row for row in rows if "| development 0 |" in row)
    assert f"{mean:+.3f}" in first
    assert "combination:" in text  # the gates table


def test_summary_refuses_runs_of_different_sources(suite_dir, tmp_path):
    import shutil

    shutil.copytree(suite_dir / "runs", tmp_path / "runs")
    meta_path = suite.run_directory(tmp_path, "synthetic_doubles", 10) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(meta | {"source": "0000"}))
    with pytest.raises(ValueError, match="different sources"):
        suite.summarize(tmp_path)


def test_bold_only_a_strict_winner():
    assert suite._bold_strict_best({"a": 0.1, "b": 0.2}) == {"a"}
    assert suite._bold_strict_best({"a": 0.1, "b": 0.1000004}) == set()  # equal to three decimals: a tie
    assert suite._bold_strict_best({"a": 0.3, "b": 0.2}, higher_is_better=True) == {"a"}
    assert suite._bold_strict_best({"a": float("nan")}) == set()


def test_seed_groups_and_named_splits():
    assert [suite.seed_group(s) for s in (0, 2, 10, 12, 5)] == [
        "development",
        "development",
        "confirmation",
        "confirmation",
        "other",
    ]
    assert sum(entry.group == "kang" for entry in suite.SUITE.values()) == 7
    drug_split = suite.SUITE["drugs_unseen_dose"]
    assert drug_split.fraction == 0.3 and "30%" in drug_split.title  # its title says what it holds out
    with pytest.raises(ValueError, match="Unknown suite split"):
        suite.run_suite(["nope"], [0], "unused", TINY, progress=False)


def test_paired_difference_pairs_by_condition_and_seed():
    scores = pd.DataFrame(
        {
            "method": ["doloris", "anchor", "doloris", "anchor", "doloris"],
            "seed": [0, 0, 1, 1, 2],
            "perturbation": "A",
            "cell_type": "all",
            "gene_set": "all",
            "metric": "e_distance",
            "value": [1.0, 2.0, 3.0, 3.5, 9.0],  # seed 2 has no anchor score: left out
        }
    )
    mean, se, n = sd.benchmark.paired_difference(scores, "doloris", "anchor")
    assert n == 2 and mean == pytest.approx(-0.75) and se == pytest.approx(np.std([-1.0, -0.5], ddof=1) / np.sqrt(2))
