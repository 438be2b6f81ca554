"""The project's type check: mypy over the package, the TensorRT modules against tensorrt-stubs.

Plain `mypy fol_infer` cannot judge a TensorRT call: the stubs ship no py.typed marker and do not
parse (parameters named `in`), so with `ignore_missing_imports` every TensorRT name is Any and
the check passes without reading them. This test is the type check CI runs: it copies the stubs
with their unparsable signatures made generic, puts them on mypy's path, and checks the package
and two scratch files in one run: a deliberate wrong call must fail, the right one must pass.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: mypy's own dependency
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
RIGHT = """import tensorrt as trt


def pin(network: trt.INetworkDefinition, config: trt.IBuilderConfig) -> bool:
    layer = network.get_layer(0)
    layer.precision = trt.DataType.FLOAT
    layer.set_output_type(0, trt.DataType.FLOAT)
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    return config.set_timing_cache(config.create_timing_cache(b""), False)
"""
WRONG = {  # line -> the error mypy must report there
    "network.get_layer('a')": '"get_layer" of "INetworkDefinition" has incompatible type "str"',
    "trt.BuilderFlag.FP17": 'has no attribute "FP17"',
    "config.set_timing_cache(config.create_timing_cache(b''))": "Missing positional argument",
    "network.get_layer(0).set_output_type('0', trt.DataType.FLOAT)": 'incompatible type "str"',
}


def repaired_stubs(dst: Path) -> Path:
    """tensorrt-stubs copied with its few unparsable signatures (`in` as a name) made generic."""
    found = importlib.util.find_spec("tensorrt_stubs")
    if found is None or found.origin is None:
        pytest.skip("tensorrt-stubs is not installed (pip install --no-deps tensorrt-stubs)")
    site = Path(found.origin).parents[1]
    signature = re.compile(r"^(\s*)def (\w+)\(.*$")
    for package in ("tensorrt", "tensorrt_bindings"):
        for stub in sorted((site / package).glob("*.pyi")):
            lines = stub.read_text().splitlines()
            for _ in range(len(lines)):
                try:
                    ast.parse("\n".join(lines))
                    break
                except SyntaxError as exc:
                    match = signature.match(lines[(exc.lineno or 1) - 1])
                    if match is None:
                        pytest.skip(f"{stub} has a syntax error this test cannot repair: {exc}")
                    indent, name = match.groups()
                    lines[(exc.lineno or 1) - 1] = (
                        f"{indent}def {name}(*args: typing.Any) -> typing.Any:"
                    )
            (dst / package).mkdir(parents=True, exist_ok=True)
            (dst / package / stub.name).write_text("\n".join(lines) + "\n")
    return dst


def mypy(tmp_path: Path, *files: str) -> subprocess.CompletedProcess[str]:
    pytest.importorskip("mypy", reason="mypy is a dev dependency")
    stubs = repaired_stubs(tmp_path / "stubs")
    settings = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"]
    lines = ["[mypy]", *(f"{k} = {v}" for k, v in settings.items()), f"mypy_path = {stubs}"]
    lines += ["follow_imports = silent"]  # judge these files, not their imports
    for module in ("tensorrt", "tensorrt.*", "tensorrt_bindings", "tensorrt_bindings.*"):
        lines += [f"[mypy-{module}]", "ignore_errors = True"]
    (tmp_path / "mypy.ini").write_text("\n".join(lines) + "\n")
    command = [sys.executable, "-m", "mypy", "--config-file", str(tmp_path / "mypy.ini")]
    command += ["--cache-dir", str(REPO / ".mypy_cache" / "stubs"), *files]  # git-ignored
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True)


@pytest.mark.slow
def test_package_type_checks_against_tensorrt_stubs(tmp_path: Path) -> None:
    """One mypy run: the package and the right call pass, each wrong call fails where it is."""
    (tmp_path / "right.py").write_text(RIGHT)
    wrong = [
        "import tensorrt as trt",
        "",
        "",
        "def f(network: trt.INetworkDefinition, config: trt.IBuilderConfig) -> None:",
    ]
    wrong += [f"    {call}" for call in WRONG]
    (tmp_path / "wrong.py").write_text("\n".join(wrong) + "\n")
    result = mypy(tmp_path, "fol_infer", str(tmp_path / "right.py"), str(tmp_path / "wrong.py"))
    out = result.stdout + result.stderr
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert not [e for e in errors if e.startswith("fol_infer")], out
    assert not [e for e in errors if "right.py" in e], out
    for lineno, (call, message) in enumerate(WRONG.items(), start=len(wrong) - len(WRONG) + 1):
        assert any(f"wrong.py:{lineno}:" in e and message in e for e in errors), (call, out)
    assert result.returncode == 1, out


def test_readme_names_the_tensorrt_version_the_stubs_describe() -> None:
    try:
        version = importlib.metadata.version("tensorrt-stubs")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("tensorrt-stubs is not installed (pip install --no-deps tensorrt-stubs)")
    api = ".".join(version.split(".")[:4])  # 10.13.0.35.1: stubs release 1 of TensorRT 10.13.0.35
    for doc in ("README.md", "export/README.md"):
        text = (REPO / doc).read_text()
        assert f"tensorrt-stubs=={version}" in text or f"tensorrt-stubs {version}" in text, doc
        assert f"TensorRT {api}" in text, doc
    assert f"tensorrt-stubs=={version}" in (REPO / ".ci" / "run").read_text()
