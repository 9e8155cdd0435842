"""jtinker: a post-training runtime in JAX that speaks the Tinker API.

``import jtinker as tinker`` runs scripts written for the official ``tinker`` SDK in process.
"""

from jtinker import (
    hostmem,  # noqa: F401  (first: sets up the allocator before XLA starts threads)
    types,
    xlaflags,  # noqa: F401  (before any backend starts: XLA reads XLA_FLAGS once)
)
from jtinker.client import APIFuture, SamplingClient, ServiceClient, TrainingClient
from jtinker.errors import APIError, NotFoundError, TinkerError
from jtinker.rest import RestClient
from jtinker.types import (
    AdamParams,
    Datum,
    EncodedTextChunk,
    ForwardBackwardOutput,
    LossFnType,
    ModelInput,
    SampleResponse,
    SamplingParams,
    TensorData,
)

__version__ = "0.1.0"

__all__ = [
    "APIError",
    "APIFuture",
    "AdamParams",
    "Datum",
    "EncodedTextChunk",
    "ForwardBackwardOutput",
    "LossFnType",
    "ModelInput",
    "NotFoundError",
    "RestClient",
    "SampleResponse",
    "SamplingClient",
    "SamplingParams",
    "ServiceClient",
    "TensorData",
    "TinkerError",
    "TrainingClient",
    "types",
]
