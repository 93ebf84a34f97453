"""The one element-type table: ONNX names and codes <-> numpy <-> torch.

Channel graphs name element types as ONNX does (``TensorInfo.dtype``:
``"FLOAT"``, ``"INT64"``...); this table translates them. Torch is imported
only by the functions that return or take torch dtypes.

Example:
    >>> numpy_dtype("FLOAT16"), numpy_dtype("BFLOAT16"), by_code(7).onnx
    (dtype('float16'), dtype('float32'), 'INT64')
"""
from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "DTYPES",
    "FLOAT_TYPES",
    "UNDEFINED",
    "WEIGHT_TYPES",
    "DType",
    "by_code",
    "by_name",
    "numpy_dtype",
    "onnx_name_of_numpy",
    "onnx_name_of_torch",
    "torch_dtype",
    "torch_dtypes_by_code",
    "torch_to_onnx_names",
]

UNDEFINED = "UNDEFINED"
"""The name of an element type the table does not know."""


@dataclasses.dataclass(frozen=True)
class DType:
    """One element type.

    Attributes:
        onnx: ONNX name (``TensorProto.DataType`` key), as channel graphs store it.
        code: ONNX ``TensorProto.DataType`` value.
        numpy: numpy dtype name, or None where numpy has none (bfloat16).
        torch: ``torch`` attribute name of the dtype.
        floating: Whether it is a floating-point type.
    """

    onnx: str
    code: int
    numpy: str | None
    torch: str
    floating: bool = False


DTYPES: tuple[DType, ...] = (
    DType("FLOAT", 1, "float32", "float32", floating=True),
    DType("UINT8", 2, "uint8", "uint8"),
    DType("INT8", 3, "int8", "int8"),
    DType("INT16", 5, "int16", "int16"),
    DType("INT32", 6, "int32", "int32"),
    DType("INT64", 7, "int64", "int64"),
    DType("BOOL", 9, "bool", "bool"),
    DType("FLOAT16", 10, "float16", "float16", floating=True),
    DType("DOUBLE", 11, "float64", "float64", floating=True),
    DType("BFLOAT16", 16, None, "bfloat16", floating=True),
)

_BY_NAME = {d.onnx: d for d in DTYPES}
_BY_CODE = {d.code: d for d in DTYPES}

FLOAT_TYPES = frozenset(d.onnx for d in DTYPES if d.floating)
"""ONNX names of the floating-point types (weights that can be pruned and scored)."""

WEIGHT_TYPES = FLOAT_TYPES | frozenset({"INT8", "UINT8", "INT4", "UINT4"})
"""Element types of weights: the float types and the quantized ones (int8 weights, packed int4 blocks).

Other integer constants (INT64 shapes, INT32 indices or quantized biases) are not weights: a group that
lives only in them carries no weight."""


def by_code(code: int) -> DType:
    """The type of an ONNX ``TensorProto.DataType`` value.

    Raises:
        KeyError: For a type the table does not know.
    """
    return _BY_CODE[code]


def by_name(name: str) -> DType:
    """The type of an ONNX type name (``"FLOAT"``).

    Raises:
        KeyError: For a type the table does not know.
    """
    return _BY_NAME[name]


def onnx_name_of_numpy(dtype: Any) -> str:
    """The ONNX type name of a numpy dtype; :data:`UNDEFINED` for anything else."""
    name = np.dtype(dtype).name
    return next((d.onnx for d in DTYPES if d.numpy == name), UNDEFINED)


def numpy_dtype(name: str, default: Any = np.float32) -> np.dtype:
    """The numpy dtype of an ONNX type name; ``default`` where numpy has none or the name is unknown."""
    d = _BY_NAME.get(name)
    return np.dtype(d.numpy if d is not None and d.numpy is not None else default)


def torch_dtype(name: str) -> torch.dtype | None:
    """The torch dtype of an ONNX type name, or None when unknown."""
    import torch

    d = _BY_NAME.get(name)
    return getattr(torch, d.torch) if d is not None else None


@functools.cache
def torch_dtypes_by_code() -> dict[int, torch.dtype]:
    """ONNX ``TensorProto.DataType`` value -> torch dtype, for every type of the table."""
    import torch

    return {d.code: getattr(torch, d.torch) for d in DTYPES}


@functools.cache
def torch_to_onnx_names() -> dict[torch.dtype, str]:
    """torch dtype -> ONNX type name, for every type of the table."""
    import torch

    return {getattr(torch, d.torch): d.onnx for d in DTYPES}


def onnx_name_of_torch(dtype: Any) -> str:
    """The ONNX type name of a torch dtype; :data:`UNDEFINED` for anything else."""
    return torch_to_onnx_names().get(dtype, UNDEFINED)
