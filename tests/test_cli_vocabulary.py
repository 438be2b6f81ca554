"""One CLI vocabulary: output files are --X-out (old spellings accepted one release, with a
note), JSON on stdout is --json, counts are at least 1, options that cannot apply are refused,
and every placeholder is upper-case."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from fol_infer.cli import app

runner = CliRunner()
SEEDS_AND_LIMITS = {"--seed", "--warmup", "--distractors", "--max-lines", "--opset"}


def commands(group: Any = None, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every command of the CLI, sub-commands of `show` included, as the help shows them."""
    group = group or typer.main.get_command(app)
    for name in group.list_commands(None):
        command = group.get_command(None, name)
        if hasattr(command, "list_commands"):
            yield from commands(command, f"{prefix}{name} ")
        else:
            yield prefix + name, command


def test_every_placeholder_is_upper_case_and_every_count_at_least_one() -> None:
    seen = 0
    for name, command in commands():
        for param in command.params:
            if getattr(param, "is_flag", False) or param.name == "help":
                continue
            seen += 1
            metavar = param.metavar or ""
            literal_choices = "|" in metavar  # e.g. onnx|torch|trt: the values themselves
            assert metavar and (literal_choices or metavar == metavar.upper()), (
                name,
                param.name,
                metavar,
            )
            kind = getattr(param, "type_descriptor", None)
            flag = (getattr(param, "opts", None) or [param.name])[0]
            if kind is not None and kind.annotation is int and flag not in SEEDS_AND_LIMITS:
                assert getattr(param, "min", None) == 1, (name, flag)
    assert seen > 50


def test_an_output_file_is_x_out_and_the_old_spelling_still_works(
    map_builds, tmp_path: Path
) -> None:
    query = ["query", str(map_builds.get()), str(map_builds.queries[0]), "--top-k", "2"]
    query += ["--rerank-k", "2"]
    new, old = tmp_path / "new.csv", tmp_path / "old.csv"
    result = runner.invoke(app, [*query, "--csv-out", str(new)])
    assert result.exit_code == 0 and "is now" not in result.output, result.output
    result = runner.invoke(app, [*query, "--csv", str(old)])
    assert result.exit_code == 0, result.output
    assert "note: --csv is now --csv-out" in " ".join(result.output.split())
    assert old.read_bytes() == new.read_bytes()
    result = runner.invoke(app, [*query, "--csv", str(old), "--csv-out", str(new)])
    assert result.exit_code == 2 and "give --csv-out only" in result.output


@pytest.mark.parametrize(
    ("argv", "refused"),
    [
        (["query", "IDX", "Q", "--timeout", "5"], "--timeout applies to a map served on Ray"),
        (["query", "IDX", "Q", "--no-rerank", "--rerank-k", "5"], "--rerank-k has no effect"),
        (["query", "IDX", "Q", "--no-rerank", "--threshold", "0.5"], "--threshold has no effect"),
        (["show", "results", "IDX", "Q", "--out", "r.png", "--no-rerank", "--reranker", "cpu"],
         "--reranker has no effect"),
        (["export", "CKPT", "--precision", "fp32"], "--precision applies to the TensorRT"),
        (["export", "CKPT", "--max-batch", "4"], "--max-batch applies to the TensorRT"),
        (["bench", "--bundle", "B", "--resolution", "224"], "--resolution applies when exporting"),
    ],
)  # fmt: skip
def test_an_option_that_cannot_apply_is_refused(argv: list[str], refused: str) -> None:
    result = runner.invoke(app, argv)
    assert result.exit_code == 2 and refused in result.output, result.output
    assert result.output.count("\n") == 1  # one line, before any work


def test_a_checkpoint_for_another_backend_is_refused(map_builds, tmp_path: Path) -> None:
    ckpt = tmp_path / "c.pth"
    ckpt.write_bytes(b"")
    for command in (
        ["index", map_builds.bundle, map_builds.db, "--out", tmp_path / "i", "--checkpoint", ckpt],
        ["index", map_builds.bundle, map_builds.db, "--out", tmp_path / "m", "--shards", "2",
         "--checkpoint", ckpt],
        ["encode", map_builds.bundle, map_builds.queries[0], "--out", tmp_path / "e.npz",
         "--checkpoint", ckpt],
    ):  # fmt: skip
        result = runner.invoke(app, [str(a) for a in command])
        assert result.exit_code == 2, result.output
        assert "a checkpoint is read by the torch backend only, not by onnx" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pth"]


def test_bench_prints_json_with_json(tiny_bundle: Path, tmp_path: Path) -> None:
    """--json prints the report (query and info do the same); --json-out writes it."""
    from sample_images import make_images

    for folder in ("database", "queries"):
        make_images(tmp_path / "ds" / "images" / "test" / folder, 2)
    result = runner.invoke(
        app, ["bench", "--bundle", str(tiny_bundle), "--dataset", str(tmp_path / "ds"),
              "--warmup", "0", "--rerank-k", "2", "--json"]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    import json

    assert json.loads(result.stdout)["schema"] == "fol-infer-bench"
