"""The names the encodings reader and writer share: the file versions, the error and warning types, and
the record of everything read from a file (the format itself is described in pyquant.sim.encodings)."""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Union

from ..quant.encoding import Encoding

__all__ = ["VERSIONS", "PathLike", "EncodingsError", "EncodingsWarning", "EncodingsFile"]

VERSIONS = ("0.6.1", "1.0.0", "2.0.0")
PathLike = Union[str, os.PathLike]


class EncodingsError(ValueError):
    """An encoding that cannot be written, or a file entry that cannot be read; the message names it."""


class EncodingsWarning(UserWarning):
    """File entries that were skipped (e.g. int32 bias encodings, which pyquant does not simulate)."""


@dataclasses.dataclass
class EncodingsFile:
    """Everything :func:`read_encodings` found in a file."""

    version: str
    activation: dict[str, Encoding]
    params: dict[str, Encoding]
    quantizer_args: Optional[dict] = None
    excluded_layers: list = dataclasses.field(default_factory=list)
    producer: Optional[dict] = None
    float_tensors: dict[str, int] = dataclasses.field(default_factory=dict)
    """Tensors kept in floating point (``"dtype": "FLOAT"`` entries): name -> bitwidth."""
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    """Integer entries pyquant cannot represent (wider than 16 bits, e.g. int32 bias): name -> reason."""
