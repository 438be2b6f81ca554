"""Options and settings without bounds are refused: counts below 1, NaN, infinities, text,
times and radii outside their range, thresholds no cosine can reach (the API too)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fol_infer.cli import app
from fol_infer.errors import UsageError
from fol_infer.positions import positives
from fol_infer.rerank import RerankSettings
from fol_infer.viz.results import results_figure

BAD_FLOATS = ["nan", "inf", "-inf", "1e309", "abc", ""]
QUERY = ["query", "no-index", "q.jpg"]
RESULTS = ["show", "results", "no-index", "q.jpg", "--out", "r.png"]
BENCH = ["bench", "--dataset", "no-dataset"]
CASES = [
    *[(QUERY, "--timeout", v) for v in [*BAD_FLOATS, "-1", "0", "0.001", "3601"]],
    *[(QUERY, "--threshold", v) for v in [*BAD_FLOATS, "2", "1", "-1.5"]],
    *[(QUERY, option, v) for option in ("--top-k", "--rerank-k") for v in ("0", "-1", "abc")],
    *[(RESULTS, "--positive-radius", v) for v in [*BAD_FLOATS, "0", "-5"]],
    *[(RESULTS, option, "0") for option in ("--top-k", "--rerank-k")],
    (RESULTS, "--threshold", "2"),
    *[(BENCH, "--positive-radius", v) for v in ("nan", "0", "-5")],
    (BENCH, "--threshold", "nan"),
    (["show", "matches", "b", "q.jpg", "c.jpg", "--out", "m.png"], "--max-lines", "-1"),
    *[(["build-trt", "no-bundle"], "--workspace", v) for v in ("0", "-1", "nan", "inf")],
]


@pytest.mark.parametrize(("argv", "option", "value"), CASES)
def test_an_unbounded_value_is_a_usage_error_naming_the_option(
    argv: list[str], option: str, value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [*argv, f"{option}={value}"])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}'" in result.output and "Traceback" not in result.output
    assert not any(tmp_path.iterdir())  # refused while parsing: nothing was touched


TAKEN = [
    ("--timeout", "0.1", "--ray", "auto"),  # --timeout applies with --ray only
    ("--threshold", "-1"),
    ("--threshold", "0.999"),
    ("--top-k", "1"),
]


@pytest.mark.parametrize("options", TAKEN)
def test_values_inside_the_bounds_are_taken(
    options: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [*QUERY, *options])
    assert result.exit_code == 2 and "Invalid value" not in result.output  # the index is missing
    assert "no-index" in result.output


def test_the_api_refuses_what_the_cli_refuses() -> None:
    for threshold in (2.0, 1.0, -1.01, float("nan"), float("inf")):
        with pytest.raises(UsageError, match=r"threshold must be a finite number in \[-1, 1\)"):
            RerankSettings(threshold=threshold)
    assert RerankSettings(threshold=-1).threshold == -1.0
    one = np.zeros((1, 2))
    for radius in (0.0, -5.0, float("nan"), float("inf")):
        with pytest.raises(UsageError, match="radius must be a finite distance > 0 m"):
            positives(one, one, radius)
        with pytest.raises(UsageError, match="radius must be a finite distance > 0 m"):
            results_figure([], None, None, radius)
