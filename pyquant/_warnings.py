"""pyquant's warning categories, so that callers (and AutoQuant) filter warnings by what they mean
rather than by their text."""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

__all__ = ["PyquantWarning", "NothingToDoWarning", "UnquantizedOpWarning", "nothing_to_do", "ignoring_nothing_to_do"]


class PyquantWarning(UserWarning):
    """Base class of pyquant's own warning categories."""


class NothingToDoWarning(PyquantWarning):
    """A technique found nothing to change in the model (no batch norm to fold, no layer pair to
    equalize, no quantized layer to correct): the model is returned as it was."""


class UnquantizedOpWarning(PyquantWarning):
    """The simulation met ops it does not know and left their outputs unquantized (a target may quantize
    them: the simulation would then predict it too well); `QuantSim.summary()` lists them with the reason."""


def nothing_to_do(message: str, stacklevel: int = 3) -> None:
    warnings.warn(message, NothingToDoWarning, stacklevel=stacklevel)


@contextlib.contextmanager
def ignoring_nothing_to_do() -> Iterator[None]:
    """Within the block, NothingToDoWarning is not shown (a caller that reports the outcome itself)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NothingToDoWarning)
        yield


def verbose_switch(verbose: object, where: str) -> contextlib.AbstractContextManager:
    """The deprecated `verbose=` argument of the techniques: given at all, a DeprecationWarning; False,
    NothingToDoWarning is not shown (as `warnings.simplefilter("ignore", NothingToDoWarning)` does)."""
    from ._deprecation import _UNSET
    if verbose is _UNSET:
        return contextlib.nullcontext()
    warnings.warn(f"{where}: 'verbose' is deprecated; to silence the 'nothing to do' warning, filter "
                  f"pyquant.NothingToDoWarning", DeprecationWarning, stacklevel=3)
    return contextlib.nullcontext() if verbose else ignoring_nothing_to_do()
