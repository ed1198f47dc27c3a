"""What capturing a model in place (`QuantSim(..., in_place=True)`) changes on the model before any
quantizer is installed -- each module's train/eval mode and class (fused modules run decomposed) and a
transformers config's `use_cache` -- recorded first, so that a construction refused at that stage (an
untraceable model, a hardware config the graph cannot satisfy) leaves the model as it was."""
from __future__ import annotations

from torch import nn

__all__ = ["InPlaceChanges"]


class InPlaceChanges:
    """The state of `model` that an in-place capture changes; `restore()` puts it back."""

    def __init__(self, model: nn.Module):
        self._modules = [(m, m.training, m.__class__) for m in model.modules()]
        config = getattr(model, "config", None)
        self._config = (config, config.use_cache) if config is not None and hasattr(config, "use_cache") else None

    def restore(self) -> None:
        for m, training, cls in self._modules:
            m.__class__ = cls
            m.training = training
        if self._config is not None:
            self._config[0].use_cache = self._config[1]
