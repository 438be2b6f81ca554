"""Quiet by default: the exporter's dependency chatter is held back unless --verbose."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from fol_infer.cli.app import configure_logging


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture()
def chatty() -> Iterator[tuple[logging.Logger, Collect]]:
    """The logger torch's exporter uses for "torchvision is not installed" lines."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    handler = Collect()
    logger.addHandler(handler)
    ours, root = logging.getLogger("fol_infer"), logging.getLogger()
    levels = ours.level, root.level
    yield logger, handler
    logger.removeHandler(handler)
    ours.setLevel(levels[0])
    root.setLevel(levels[1])


def test_exporter_chatter_only_under_verbose(chatty: tuple[logging.Logger, Collect]) -> None:
    pytest.importorskip("torch")
    from fol_infer.export.onnx import _quiet_exporter

    logger, seen = chatty
    line = "torchvision is not installed. Skipping torchvision::nms"
    configure_logging(verbose=False)
    with _quiet_exporter():
        logger.warning(line)
    assert seen.messages == []
    logger.warning("outside the export")  # the level comes back afterwards
    assert seen.messages == ["outside the export"]
    configure_logging(verbose=True)
    with _quiet_exporter():
        logger.warning(line)
    assert seen.messages[-1] == line
    configure_logging(verbose=False)


def test_cli_notes_and_warnings_read_plainly(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(verbose=False)
    log = logging.getLogger("fol_infer.rerank.dispatch")
    log.info("re-ranking on the CPU (no NVIDIA GPU on this machine)")
    log.warning("something to act on")
    log.debug("hidden")
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "note: re-ranking on the CPU (no NVIDIA GPU on this machine)",
        "warning: something to act on",
    ]
