"""A bundle: the folder `fol-infer export` writes and every runtime opens. The manifest
(`manifest`) is the contract between export time and run time; `graph_inputs` reads each
graph's declared inputs without loading its weights."""

from fol_infer.bundle.manifest import (
    FORMAT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MANIFEST,
    MAX_BATCH,
    PRODUCT,
    SCHEMA_VERSION,
    Bundle,
    GraphSpec,
    Manifest,
    TensorSpec,
    preprocessing_spec,
)

__all__ = [
    "FORMAT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MANIFEST",
    "MAX_BATCH",
    "PRODUCT",
    "SCHEMA_VERSION",
    "Bundle",
    "GraphSpec",
    "Manifest",
    "TensorSpec",
    "preprocessing_spec",
]
