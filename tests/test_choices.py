"""Every list of choices has one source, `fol_infer.choices`, and the command line reads it."""

from __future__ import annotations

import ast
import inspect
import types
import typing
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fol_infer import choices
from fol_infer.choices import Choice, EncoderBackend, Precision, RerankBackend, TokenFormat
from fol_infer.cli import app
from fol_infer.errors import UsageError

PACKAGE = Path(choices.__file__).parent
ENUMS = [
    obj
    for obj in vars(choices).values()
    if isinstance(obj, type) and issubclass(obj, Choice) and obj is not Choice
]


def _enum_of(annotation: object) -> type[Choice] | None:
    """The Choice enum an option is annotated with (through Annotated and `| None`)."""
    if typing.get_origin(annotation) is typing.Annotated:
        return _enum_of(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        found = [e for a in typing.get_args(annotation) if (e := _enum_of(a)) is not None]
        return found[0] if found else None
    if isinstance(annotation, type) and issubclass(annotation, Choice):
        return annotation
    return None


def _choice_options() -> list[tuple[str, str, type[Choice], list[str]]]:
    """(command, option, enum, argv up to the option) for every choice option; the argv holds
    the command's required parameters and the option's metavar as its last item."""
    import typer

    group = typer.main.get_command(app)
    found = []
    for info in app.registered_commands:
        callback = inspect.unwrap(info.callback)
        name = info.name or callback.__name__.replace("_", "-")
        hints = typing.get_type_hints(callback, include_extras=True)
        command = group.commands[name]  # type: ignore[attr-defined]
        required = []
        for param in command.params:
            if param.required:
                is_argument = not param.opts[0].startswith("-")
                required += ["x"] if is_argument else [param.opts[0], "x"]
        for param in command.params:
            enum = _enum_of(hints[param.name])
            if enum is not None:
                found.append((name, param.opts[0], enum, [name, *required, param.metavar]))
    return found


def test_every_choice_option_is_typed_with_an_enum_of_choices() -> None:
    options = _choice_options()
    by_name = {(cmd, opt): enum for cmd, opt, enum, _ in options}
    assert by_name[("bench", "--backend")] is EncoderBackend
    assert by_name[("bench", "--tokens")] is TokenFormat
    assert by_name[("index", "--tokens")] is TokenFormat
    assert by_name[("query", "--reranker")] is RerankBackend
    assert by_name[("verify", "--precision")] is Precision
    assert by_name[("build-trt", "--precision")] is Precision
    assert {enum for _, _, enum, _ in options} == set(ENUMS)  # no enum without its option
    # No option takes one of these words as a plain string next to them.
    words = {v for enum in ENUMS for v in enum.values()} - {"auto"}
    for info in app.registered_commands:
        callback = inspect.unwrap(info.callback)
        hints = typing.get_type_hints(callback, include_extras=True)
        for pname, param in inspect.signature(callback).parameters.items():
            if _enum_of(hints[pname]) is None:
                assert param.default not in words, (callback.__name__, pname)


@pytest.mark.parametrize(("command", "option", "enum", "argv"), _choice_options())
def test_cli_lists_and_refuses_with_the_enum_values(
    command: str, option: str, enum: type[Choice], argv: list[str]
) -> None:
    *args, metavar = argv
    assert metavar == "|".join(enum.values())  # what --help shows
    result = CliRunner().invoke(app, [*args, option, "no-such-choice"])
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2, result.output
    assert f"'no-such-choice' is not one of {enum.listed()}" in text


def test_library_parse_names_the_choices() -> None:
    assert EncoderBackend.parse("trt", "backend") is EncoderBackend.TRT
    with pytest.raises(UsageError, match="unknown token format 'int4': choose one of fp16, int8"):
        TokenFormat.parse("int4", "token format")
    assert str(TokenFormat.INT8_EXACT) == f"{TokenFormat.INT8_EXACT}" == "int8-exact"
    assert {TokenFormat.FP16: 1}["fp16"] == 1  # members hash as the words they stand for


def test_no_module_types_a_choice_list_again() -> None:
    """A module-level tuple, list or set of two or more of an enum's words is a copy."""
    copies = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "choices.py":
            continue
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, (ast.Assign, ast.AnnAssign)) or node.value is None:
                continue
            if not isinstance(node.value, (ast.Tuple, ast.List, ast.Set)):
                continue
            words = {
                e.value
                for e in node.value.elts
                if isinstance(e, ast.Constant) and isinstance(e.value, str)
            }
            for enum in ENUMS:
                if len(words) >= 2 and words <= set(enum.values()):
                    copies.append(f"{path.relative_to(PACKAGE)}:{node.lineno} copies {enum}")
    assert copies == []
