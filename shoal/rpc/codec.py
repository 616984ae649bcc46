"""Tensors between numpy and shoal's wire ``Tensor``: raw buffers, never lists."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from shoal.core import tensors
from shoal.proto import shoal_pb2 as pb


def encode(arrays: Mapping[str, np.ndarray]) -> list[pb.Tensor]:
    out = []
    for name, arr in arrays.items():
        arr = np.asarray(arr)
        out.append(
            pb.Tensor(
                name=name, datatype=tensors.datatype_of(arr), shape=arr.shape, data=tensors.to_bytes(arr)
            )
        )
    return out


def decode(items: Iterable[pb.Tensor]) -> dict[str, np.ndarray]:
    """Raises InvalidArgument when a tensor's bytes disagree with its shape or datatype."""
    out: dict[str, np.ndarray] = {}
    for t in items:
        out[t.name] = tensors.from_bytes(t.datatype, tuple(t.shape), t.data, name=t.name)
    return out
