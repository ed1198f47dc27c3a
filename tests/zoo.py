"""Architectures of the QuantSim model zoo, written here (no torchvision): each in the module layout of its
reference implementation, at small widths and input sizes so that the zoo runs in seconds. Weights are
random; batch norms get running statistics from a few batches of data, so activations have realistic
ranges."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn


def _divisible(v: float, divisor: int = 8) -> int:
    """torchvision's _make_divisible: round channels to a multiple of `divisor`, never below 90%."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


# ---- ResNet (torchvision.models.resnet layout: one ReLU module per block, called twice or thrice) -------------
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, block: type, layers: list[int], width: int = 64, num_classes: int = 10):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], 2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], 2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)

    def _make_layer(self, block: type, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(width: int = 16) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], width)


def resnet50(width: int = 8) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], width)


# ---- MobileNetV3-Small (torchvision.models.mobilenetv3 layout) -------------------------------------------
class ConvNormActivation(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1,
                 act: Optional[Callable[[], nn.Module]] = nn.ReLU):
        layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if act is not None:
            layers.append(act())
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int, activation: Callable[[], nn.Module] = nn.ReLU,
                 scale_activation: Callable[[], nn.Module] = nn.Hardsigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, k: int, exp: int, cout: int, se: bool, act: Callable[[], nn.Module], stride: int):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if exp != cin:
            layers.append(ConvNormActivation(cin, exp, 1, act=act))
        layers.append(ConvNormActivation(exp, exp, k, stride, groups=exp, act=act))
        if se:
            layers.append(SqueezeExcitation(exp, _divisible(exp // 4)))
        layers.append(ConvNormActivation(exp, cout, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_res_connect else out


class MobileNetV3Small(nn.Module):
    SETTINGS = [  # in, kernel, expanded, out, squeeze-excitation, activation, stride
        (16, 3, 16, 16, True, "RE", 2), (16, 3, 72, 24, False, "RE", 2), (24, 3, 88, 24, False, "RE", 1),
        (24, 5, 96, 40, True, "HS", 2), (40, 5, 240, 40, True, "HS", 1), (40, 5, 240, 40, True, "HS", 1),
        (40, 5, 120, 48, True, "HS", 1), (48, 5, 144, 48, True, "HS", 1), (48, 5, 288, 96, True, "HS", 2),
        (96, 5, 576, 96, True, "HS", 1), (96, 5, 576, 96, True, "HS", 1),
    ]

    def __init__(self, width_mult: float = 0.5, num_classes: int = 10, last_channel: int = 256):
        super().__init__()
        c = lambda v: _divisible(v * width_mult)
        layers: list[nn.Module] = [ConvNormActivation(3, c(16), 3, 2, act=nn.Hardswish)]
        for cin, k, exp, cout, se, act, stride in self.SETTINGS:
            layers.append(InvertedResidual(c(cin), k, c(exp), c(cout), se,
                                           nn.Hardswish if act == "HS" else nn.ReLU, stride))
        last = c(96) * 6
        layers.append(ConvNormActivation(c(96), last, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(last, last_channel), nn.Hardswish(inplace=True),
                                        nn.Dropout(0.2, inplace=True), nn.Linear(last_channel, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# ---- EfficientNet-B0 (EfficientNet-PyTorch's MBConvBlock layout: one Swish module shared by a block) ----
class MBConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, expand: int, k: int, stride: int, se_ratio: float = 0.25):
        super().__init__()
        exp = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, exp, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(exp)
        self._depthwise_conv = nn.Conv2d(exp, exp, k, stride, k // 2, groups=exp, bias=False)
        self._bn1 = nn.BatchNorm2d(exp)
        squeeze = max(1, int(cin * se_ratio))
        self._se_reduce = nn.Conv2d(exp, squeeze, 1)
        self._se_expand = nn.Conv2d(squeeze, exp, 1)
        self._project_conv = nn.Conv2d(exp, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout)
        self._swish = nn.SiLU()  # called for the expansion, the depthwise conv and inside the SE
        self.skip = stride == 1 and cin == cout

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.has_expand:
            x = self._swish(self._bn0(self._expand_conv(x)))
        x = self._swish(self._bn1(self._depthwise_conv(x)))
        s = self._se_expand(self._swish(self._se_reduce(F.adaptive_avg_pool2d(x, 1))))
        x = torch.sigmoid(s) * x
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.skip else x


class EfficientNetB0(nn.Module):
    STAGES = [  # expand ratio, kernel, stride, in, out, repeats
        (1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
        (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1),
    ]

    def __init__(self, width_mult: float = 0.25, num_classes: int = 10):
        super().__init__()
        c = lambda v: _divisible(v * width_mult)
        self._conv_stem = nn.Conv2d(3, c(32), 3, 2, 1, bias=False)
        self._bn0 = nn.BatchNorm2d(c(32))
        blocks = []
        for expand, k, stride, cin, cout, n in self.STAGES:
            for i in range(n):
                blocks.append(MBConvBlock(c(cin) if i == 0 else c(cout), c(cout), expand, k, stride if i == 0 else 1))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(c(320), c(1280), 1, bias=False)
        self._bn1 = nn.BatchNorm2d(c(1280))
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(0.2)
        self._fc = nn.Linear(c(1280), num_classes)
        self._swish = nn.SiLU()  # the stem's and the head's activation: one module, two call sites

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._swish(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self._swish(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(self._avg_pooling(x).flatten(1)))


# ---- ConvNeXt (the official block: depthwise conv, channels-last LayerNorm, MLP with GELU, layer scale) ----
class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, layer_scale: float = 0.5):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class ConvNeXtTiny(nn.Module):
    """A ConvNeXt stem (4x4 patches, channels-last LayerNorm), two blocks and the pooled LayerNorm head."""

    def __init__(self, dim: int = 32, depth: int = 2, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, 4)
        self.stem_norm = nn.LayerNorm(dim, eps=1e-6)
        self.blocks = nn.Sequential(*[ConvNeXtBlock(dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_norm(self.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = self.blocks(x)
        return self.head(self.norm(x.mean((-2, -1))))


# ---- ViT (torchvision.models.vision_transformer layout: nn.MultiheadAttention, batch first) ----------------
class MLPBlock(nn.Sequential):
    def __init__(self, dim: int, mlp_dim: int):
        super().__init__(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(mlp_dim, dim), nn.Dropout(0.0))


class EncoderBlock(nn.Module):
    def __init__(self, heads: int, dim: int, mlp_dim: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.dropout = nn.Dropout(0.0)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = self.dropout(y) + x
        return x + self.mlp(self.ln_2(x))


class ViT(nn.Module):
    def __init__(self, image: int = 32, patch: int = 8, dim: int = 32, depth: int = 2, heads: int = 4,
                 mlp_dim: int = 64, num_classes: int = 10):
        super().__init__()
        self.conv_proj = nn.Conv2d(3, dim, patch, patch)
        self.class_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embedding = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.layers = nn.Sequential(*[EncoderBlock(heads, dim, mlp_dim) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)  # (N, patches, dim)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        return self.head(self.ln(self.layers(x))[:, 0])


# ---- a BERT-style encoder whose attention adds the padding mask itself -------------------------------------
class PaddedSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        split = lambda t: t.view(t.size(0), t.size(1), self.heads, self.head_dim).transpose(1, 2)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        scores = scores + mask  # 0 where a token is attended to, finfo.min at padding
        ctx = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).flatten(2)
        return self.norm(self.dense(ctx) + x)


class PaddedEncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.attention = PaddedSelfAttention(dim, heads)
        self.intermediate = nn.Linear(dim, ffn)
        self.act = nn.GELU()
        self.output = nn.Linear(ffn, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, mask)
        return self.norm(self.output(self.act(self.intermediate(x))) + x)


class PaddedBert(nn.Module):
    """Token and position embeddings, LayerNorm, encoder layers; the extended attention mask is made from
    the integer padding mask as BERT makes it: (1 - mask) * finfo.min, added to the scores."""

    def __init__(self, vocab: int = 100, dim: int = 32, heads: int = 4, ffn: int = 64, depth: int = 2,
                 max_len: int = 32):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, dim)
        self.position_embeddings = nn.Embedding(max_len, dim)
        self.embed_norm = nn.LayerNorm(dim, eps=1e-12)
        self.layers = nn.ModuleList([PaddedEncoderLayer(dim, heads, ffn) for _ in range(depth)])
        self.mask_value = torch.finfo(torch.float32).min

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.size(1), device=input_ids.device)[None]
        x = self.embed_norm(self.word_embeddings(input_ids) + self.position_embeddings(pos))
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * self.mask_value
        for layer in self.layers:
            x = layer(x, mask)
        return x


# ---- a small Llama decoder (transformers' LlamaForCausalLM: RMSNorm, rotary tables, grouped-query SDPA) ------
def tiny_llama() -> nn.Module:
    """Two layers, hidden 64, 4 query heads sharing 2 key/value heads, a 256-token vocabulary; needs
    transformers (imported here, so that the rest of the zoo does not)."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gemma3(attn_implementation: str = "sdpa") -> nn.Module:
    """transformers' Gemma3ForCausalLM with random weights: two layers (one sliding-window, one global),
    hidden 64, 4 query heads sharing 2 key/value heads, query/key norms, a 256-token vocabulary."""
    import transformers

    cfg = transformers.Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        max_position_embeddings=64, sliding_window=8,
                                        layer_types=["sliding_attention", "full_attention"])
    cfg._attn_implementation = attn_implementation
    return transformers.Gemma3ForCausalLM(cfg).eval()


# ---- RMSNorms as models write them -------------------------------------------------------------------------
class LlamaStyleRMSNorm(nn.Module):
    """transformers' LlamaRMSNorm: float32 variance, x * rsqrt(mean(x^2) + eps), then the gain."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim) + 0.1 * torch.randn(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps)).to(dtype)


class GemmaStyleRMSNorm(nn.Module):
    """Gemma's: the gain is (1 + weight), applied before casting back."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(0.1 * torch.randn(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)


class SqrtRMSNorm(nn.Module):
    """The division form: x / sqrt(mean(x * x) + eps) * weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + self.eps) * self.weight


class NormZoo(nn.Module):
    """Every RMSNorm form above, torch.nn.RMSNorm, GroupNorm and SDPA between linear layers."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.fc = nn.ModuleList([nn.Linear(dim, dim) for _ in range(6)])
        self.norms = nn.ModuleList([LlamaStyleRMSNorm(dim), GemmaStyleRMSNorm(dim), SqrtRMSNorm(dim),
                                    nn.RMSNorm(dim, eps=1e-6)])
        self.group_norm = nn.GroupNorm(4, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fc, norm in zip(self.fc, self.norms):
            x = norm(fc(x)) + x
        x = self.group_norm(self.fc[4](x).transpose(1, 2)).transpose(1, 2)
        q = self.fc[5](x).unflatten(-1, (4, -1)).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q).transpose(1, 2).flatten(2)


def calibrate_batchnorms(model: nn.Module, x: torch.Tensor, batches: int = 4) -> nn.Module:
    """Gives random weights the batch norms of a trained network: the last batch norm of each residual
    branch scales by 0.1..0.4 (trained networks end there with small gains; at 1 the residual stream of a
    random ResNet-50 doubles every block and the network turns chaotic: a change of 1e-5 in a weight moves
    the logits by 1%), and every batch norm gets running statistics from the data (cumulative averages), so
    that it normalizes. Returns the model in eval mode."""
    for m in model.modules():
        last = None
        if isinstance(m, BasicBlock):
            last = m.bn2
        elif isinstance(m, Bottleneck):
            last = m.bn3
        elif isinstance(m, MBConvBlock):
            last = m._bn2
        elif isinstance(m, InvertedResidual):
            last = m.block[-1][1]
        if last is not None:
            with torch.no_grad():
                last.weight.uniform_(0.1, 0.4)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for chunk in x.chunk(batches):
            model(chunk)
    return model.eval()
