"""Every benchmark script takes its command line from `benchmarks/common.py` and writes its JSON
through `write_report`, so each has `--json PATH` and every report names its machine alike.

The scripts are read (always) and imported in one subprocess (where their dependencies are
installed): a machine without torch or ray still checks what it can import, and the source of
the rest, instead of failing on a missing optional module.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
HELPERS = {"common", "untrained_setup"}  # imported by the scripts, not run
OPTIONAL = {"torch", "triton", "onnx", "onnxscript", "tensorrt", "ray", "cupy", "faiss"}

# Run in the subprocess: import each script with common.parser recorded, build its options,
# parse `--json` (required options given a placeholder); a missing optional module is said.
PROBE = """
import importlib, json, sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
import common

made = []
base = common.parser


def recorded(doc):
    made.append(base(doc))
    return made[-1]


common.parser = recorded
out = {}
for name in NAMES:
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name.split(".")[0] not in OPTIONAL:
            raise
        out[name] = {"missing": exc.name}
        continue
    made.clear()
    p = module.options()
    needed = [x for a in p._actions if a.required for x in (a.option_strings[0], "x")]
    args = p.parse_args(["--json", "r.json", *needed])
    out[name] = {"from_common": made == [p], "json": str(args.json)}
    out[name]["description"] = p.description == module.__doc__
print(json.dumps(out))
"""


def scripts() -> list[Path]:
    return sorted(p for p in BENCHMARKS.glob("*.py") if p.stem not in HELPERS)


def source_problems(path: Path) -> list[str]:
    """What the source says against the rules: imports from common, `options()` built on
    `parser`, no parser of its own, no `--out`, the report written by `write_report`."""
    tree = ast.parse(path.read_text())
    imported = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "common"]
    from_common = {a.name for n in imported for a in n.names}
    options = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "options"]
    flags = {
        a.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and called_name(n) == "add_argument"
        for a in n.args
        if isinstance(a, ast.Constant)
    }
    problems = {
        "lacks parser or write_report from common": not {"parser", "write_report"} <= from_common,
        "has no options() built on common.parser": not (options and "parser" in calls(options[0])),
        "makes its own ArgumentParser": "ArgumentParser" in calls(tree),
        "has --out (JSON goes to --json, other files to --X-out)": "--out" in flags,
        "never calls write_report": "write_report" not in calls(tree),
    }
    return [f"{path.name} {what}" for what, bad in problems.items() if bad]


def calls(node: ast.AST) -> set[str | None]:
    return {called_name(n) for n in ast.walk(node) if isinstance(n, ast.Call)}


def called_name(call: ast.Call) -> str | None:
    """`f` of `f(...)` and of `x.f(...)`."""
    func = call.func
    return func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)


def test_every_benchmark_builds_its_options_on_common_and_takes_json() -> None:
    paths = scripts()
    assert len(paths) >= 14, [p.name for p in paths]
    assert [p for path in paths for p in source_problems(path)] == []
    names = [p.stem for p in paths]
    code = f"NAMES = {names!r}\nOPTIONAL = {OPTIONAL!r}\n{PROBE}"
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    imported = {n: r for n, r in found.items() if "missing" not in r}
    expected = {"from_common": True, "json": "r.json", "description": True}
    assert {n: r for n, r in imported.items() if r != expected} == {}
    assert set(found) == set(names)
