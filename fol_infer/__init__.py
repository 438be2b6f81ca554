"""fol-infer: fast engines and a retrieval runtime for FoL visual place recognition.

Data flow, one subpackage per step:
checkpoint/model (``model``) -> ``export`` -> ``bundle`` -> ``backends`` -> ``index``
-> ``rerank`` -> ``pipeline`` results. Only ``model``, ``export`` and ``backends.torch``
import torch; the CPU runtime needs neither torch nor tensorrt.
"""

__version__ = "0.1.0"
