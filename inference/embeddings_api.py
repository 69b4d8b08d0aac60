"""OpenAI's ``POST /v1/embeddings``: its request and its answer (docs/protocols.md#embeddings).

An embedding model is announced and found like any model; its provider runs
llama.cpp in embedding mode (``p2pnode start --embeddings``). The shim
splits a request's inputs into infer requests of at most
``MAX_EMBED_INPUTS`` each, sent one after another through the node, and
joins their vectors in order.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from p2pnode.inference.api_fields import bad_request, int_field
from p2pnode.inference.engine import Request
from p2pnode.protocols.infer.messages import MAX_DIMENSIONS, MAX_EMBED_INPUTS

MAX_INPUTS: Final = 2048
"""The most inputs one request may carry (OpenAI's bound)."""


@dataclass(frozen=True, slots=True)
class EmbeddingJob:
    """A parsed embeddings request."""

    model: str
    inputs: tuple[str, ...]
    dimensions: int  # 0: the model's own
    base64: bool

    def requests(self) -> list[Request]:
        """The engine requests that embed it, in order."""
        return [
            Request(
                model_id=self.model,
                kind="embedding",
                inputs=self.inputs[at : at + MAX_EMBED_INPUTS],
                dimensions=self.dimensions,
            )
            for at in range(0, len(self.inputs), MAX_EMBED_INPUTS)
        ]

    def answer(self, vectors: list[bytes], tokens: int) -> dict[str, Any]:
        """The response body for ``vectors`` (float32 little-endian, one per input)."""
        data = [
            {"object": "embedding", "index": i, "embedding": self._shown(v)}
            for i, v in enumerate(vectors)
        ]
        return {
            "object": "list",
            "data": data,
            "model": self.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    def _shown(self, vector: bytes) -> list[float] | str:
        if self.base64:  # OpenAI's base64 is of the float32 bytes, as ours travel
            return base64.b64encode(vector).decode()
        return [float(x) for x in np.frombuffer(vector, dtype="<f4")]


def parse_embedding_request(body: object) -> EmbeddingJob:
    """A ``POST /v1/embeddings`` body. Raises ApiError(400)."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required and must be a string", "model")
    value = body.get("input")
    inputs = [value] if isinstance(value, str) else value
    if not isinstance(inputs, list) or not 0 < len(inputs) <= MAX_INPUTS:
        raise bad_request(
            f"'input' must be a string or an array of 1 to {MAX_INPUTS} strings", "input"
        )
    if not all(isinstance(i, str) for i in inputs):
        raise bad_request("'input' as token ids is not served: send text", "input")
    if not all(inputs):
        raise bad_request("'input' may not hold an empty string", "input")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise bad_request("'encoding_format' must be float or base64", "encoding_format")
    dimensions = body.get("dimensions")
    dims = 0 if dimensions is None else int_field(dimensions, "dimensions", 1, MAX_DIMENSIONS)
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad_request("'user' must be a string", "user")
    return EmbeddingJob(model, tuple(inputs), dims, encoding == "base64")
