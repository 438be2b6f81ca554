"""Errors a user can act on: the CLI prints them on one line and exits with their code."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """An exception's message, first line only: a library's reason inside one of ours."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class FolInferError(Exception):
    """Base class: the message says what is wrong and what to do."""

    exit_code = 1


class UsageError(FolInferError):
    """Bad arguments or inputs the user chose (exit code 2, like typer's own usage errors)."""

    exit_code = 2


class CheckpointError(UsageError):
    """A checkpoint that is missing, not a checkpoint, or not an FoL model we support."""


class BundleError(UsageError):
    """A bundle folder that is missing, incomplete, tampered with or from another version."""


class ImageError(FolInferError):
    """An image that cannot be decoded into an RGB picture."""


class IndexStoreError(UsageError):
    """An index that is missing, torn, from another bundle or another toolkit version."""


class BackendUnavailableError(UsageError):
    """An optional engine (torch, tensorrt, triton, a GPU) is not installed or not present."""


class EngineError(FolInferError):
    """A TensorRT engine that failed to build or to run (out of memory, rejected shape)."""


class DamagedFileError(UsageError):
    """A file whose bytes differ from what was recorded when it was written (flipped bytes,
    a partial copy): named with the command that repairs it, never served."""

    def __init__(self, path: object, detail: str, repair: str) -> None:
        super().__init__(f"{path} is damaged: {detail}. Repair: {repair}")
        self.path, self.detail, self.repair = path, detail, repair

    def __reduce__(self) -> tuple[type[DamagedFileError], tuple[object, str, str]]:
        """Pickled with its own arguments, so that it crosses a process (a Ray actor) whole."""
        return type(self), (self.path, self.detail, self.repair)


class OutputWriteError(FolInferError):
    """An output file that could not be written (disk full, a folder that went away); the
    message names it, and the files it would have replaced are left as they were."""


class ShardUnavailableError(FolInferError):
    """A shard of a map that did not answer in time; the message names it and its ids."""


class ShardMismatchError(IndexStoreError):
    """A map whose shards do not hold what ``map.json`` records (shifted or overlapping id
    ranges, a shard listed twice, a shard folder replaced by another's): never served, even
    with ``allow_partial``, since its answers would be wrong rather than incomplete."""
