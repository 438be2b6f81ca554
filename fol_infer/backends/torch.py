"""The PyTorch reference backend: the model code itself, eager, float32.

Used for parity (`verify`, `bench`) and where export is not wanted. Needs the checkpoint:
from a bundle it reads the path the manifest recorded and checks the file's sha256.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fol_infer.backends.base import Encoder, GlobalOutput, LocalOutput
from fol_infer.bundle import Bundle
from fol_infer.errors import BackendUnavailableError, CheckpointError
from fol_infer.files.integrity import sha256_file


class TorchEncoder(Encoder):
    """The PyTorch model itself, eager float32: the reference the other backends are held to."""

    name = "torch"

    def __init__(
        self,
        checkpoint: str | Path,
        resolution: tuple[int, int],
        trust_checkpoint: bool = False,
        device: str = "cpu",
        threads: int | None = None,
    ) -> None:
        try:
            import torch
        except ImportError:
            raise BackendUnavailableError(
                "the torch backend needs PyTorch: pip install 'fol-infer[export]'"
            ) from None
        from fol_infer.model.checkpoint import load_checkpoint
        from fol_infer.model.graphs import GlobalGraph, LocalGraph

        if threads:
            torch.set_num_threads(threads)
        self._torch = torch
        self.device = torch.device(device)
        self.resolution = resolution
        self.loaded = load_checkpoint(checkpoint, trust=trust_checkpoint)
        model = self.loaded.model.to(self.device).eval()
        self._global = GlobalGraph(model, resolution).to(self.device).eval()
        self._local = LocalGraph(model).eval()

    @classmethod
    def from_bundle(
        cls, bundle: Bundle, checkpoint: str | Path | None = None, **kwargs: object
    ) -> TorchEncoder:
        """The reference for a bundle: its own checkpoint, verified by sha256."""
        recorded = bundle.manifest.checkpoint
        path = Path(checkpoint) if checkpoint is not None else Path(recorded["path"])
        if not path.is_file():
            raise CheckpointError(
                f"the bundle's checkpoint {path} is not there: pass --checkpoint PATH"
            )
        if sha256_file(path) != recorded["sha256"]:
            raise CheckpointError(
                f"{path} is not the checkpoint {bundle.folder} was exported from (sha256 differs)"
            )
        return cls(path, bundle.resolution, **kwargs)  # type: ignore[arg-type]

    def _encode_global_impl(self, images: np.ndarray) -> GlobalOutput:
        with self._torch.inference_mode():
            d, f, c = self._global(self._torch.from_numpy(images).to(self.device))
        return GlobalOutput(
            descriptors=d.cpu().numpy(), features=f.cpu().numpy(), confidence=c.cpu().numpy()
        )

    def _encode_local_impl(self, global_out: GlobalOutput) -> LocalOutput:
        t = self._torch
        with t.inference_mode():
            tokens, count, region = self._local(
                t.from_numpy(global_out.features).to(self.device),
                t.from_numpy(global_out.confidence).to(self.device),
            )
        return LocalOutput(
            tokens=tokens.cpu().numpy(),
            counts=count.cpu().numpy().astype(np.int64),
            region_mask=region.cpu().numpy(),
        )
