"""The paper's segmentation network: ResNet-50 bottom-up + FPN top-down head, plain torch.

Layout of ``models/fpn.py`` of the RALIS reference code (https://github.com/ArantxaCasanova/ralis),
itself adapted from kuangliu/pytorch-fpn:

* bottom-up: ResNet-50 (conv1 7x7/2, BN, ReLU, maxpool 3x3/2, layer1..4 = [3, 4, 6, 3] bottlenecks,
  stride 2 on the 3x3 conv of the first block of layer2..4, 1x1 conv + BN downsample). Module names
  equal torchvision's (``backbone.conv1``, ``backbone.layer1.0.downsample.0`` ...), so an ImageNet
  state dict maps by prefixing ``backbone.``;
* top-down: ``top`` 1x1 2048->256 on c5; laterals 1x1 1024/512/256->256; p4 = up(p5) + lat(c4),
  p3 = up(p4) + lat(c3), p2 = up(p3) + lat(c2) (bilinear, align_corners=True, to the lateral size);
* every level has its own smooth block [3x3 256->256, ReLU, 3x3 256->128, ReLU];
* p5 / p4 / p3 are upsampled x8 / x4 / x2 (bilinear, align_corners=True), centre-cropped to the p2
  size and passed through a 3x3 128->128 conv;
* concat (512 channels, stride 4) -> optional MC dropout -> 3x3 512->num_classes -> bilinear to the
  input size.

Input sizes not divisible by 32 (CamVid's 360 rows): the backbone rounds every stride-2 stage up
(``ceil``), so c2..c5 of a 360-row image have 90/45/23/12 rows. The top-down ``up`` resizes to the
lateral's exact size, and the x8/x4/x2 upsampling gives 96/92/90 >= 90 rows (``2 * ceil(n / 2) >= n``
holds at every stage, so the upsampled map is never smaller than p2) and the centre crop cuts it to
p2. The last upsampling goes to the INPUT size rather than ``x4``: for sizes divisible by 4 both are
the same op (align_corners=True interpolation only depends on the input and output sizes), and for
other sizes the output still matches the labels. So 360x480, 224x224 and 1024x2048 all work.

Parameters (derived from these constants, checked by the tests): 28,526,027 for 11
classes and 28,562,899 for 19 (ResNet-50 without its fc: 23,508,032; FPN head: 4,967,296 + the
classifier 4,608 * C + C).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ralis_gym.errors import ConfigError

#: ResNet-50 stage depths (Bottleneck blocks per layer)
RESNET50_LAYERS = (3, 4, 6, 3)
#: dropout probability of the MC-dropout layer used for BALD (the reference's ``nn.Dropout()``)
MC_DROPOUT_P = 0.5
#: channels of the concatenated FPN feature map the classifier (and MC dropout) sees
FPN_FEATURES = 512


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv), as torchvision and the reference code."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        width_out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, width_out, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or inplanes != width_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, width_out, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(width_out),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50Backbone(nn.Module):
    """ResNet-50 without avgpool/fc; returns the stage outputs c2, c3, c4, c5 (strides 4..32)."""

    def __init__(self, layers: tuple[int, int, int, int] = RESNET50_LAYERS) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        stages = []
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            stage = [Bottleneck(inplanes, planes, stride)]
            inplanes = planes * Bottleneck.expansion
            stage += [Bottleneck(inplanes, planes) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return c2, c3, c4, c5


def _smooth_block() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(256, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(256, 128, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
    )


def _upsample_like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=True)


def _centre_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    dy = (x.shape[-2] - size[0]) // 2
    dx = (x.shape[-1] - size[1]) // 2
    return x[..., dy : dy + size[0], dx : dx + size[1]]


class UpsampleCrop(nn.Module):
    """Bilinear x``scale`` upsampling, centre crop to the p2 size, then a 3x3 128->128 conv."""

    def __init__(self, scale: int, channels: int = 128) -> None:
        super().__init__()
        self.scale = scale
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        up_size = (x.shape[-2] * self.scale, x.shape[-1] * self.scale)
        x = F.interpolate(x, size=up_size, mode="bilinear", align_corners=True)
        return self.conv(_centre_crop(x, size))


class FPNResNet50(nn.Module):
    """FPN on a ResNet-50; ``forward`` returns logits ``[B, C, H, W]`` at input size.

    ``forward(x, dropout_generator=g)`` applies element-wise dropout (p = ``MC_DROPOUT_P``, scaled
    by 1/(1-p) like ``nn.Dropout``) to the 512-channel concat before the classifier, with the mask
    drawn from ``g``. That is the reference's ``FPN50_bayesian`` with ``bayesian=True``;
    without a generator there is no dropout, so training and plain inference equal ``FPN50``.
    """

    def __init__(self, num_classes: int, layers: tuple[int, int, int, int] = RESNET50_LAYERS) -> None:
        super().__init__()
        self.num_classes = num_classes
        # ``layers`` other than (3, 4, 6, 3) gives a shallower ResNet with the same FPN, for tiny
        # test configurations; the paper model is always the default.
        self.backbone = ResNet50Backbone(tuple(layers))
        self.top = nn.Conv2d(2048, 256, kernel_size=1)
        self.lateral4 = nn.Conv2d(1024, 256, kernel_size=1)
        self.lateral3 = nn.Conv2d(512, 256, kernel_size=1)
        self.lateral2 = nn.Conv2d(256, 256, kernel_size=1)
        self.smooth5 = _smooth_block()
        self.smooth4 = _smooth_block()
        self.smooth3 = _smooth_block()
        self.smooth2 = _smooth_block()
        self.up5 = UpsampleCrop(8)
        self.up4 = UpsampleCrop(4)
        self.up3 = UpsampleCrop(2)
        self.classifier = nn.Conv2d(FPN_FEATURES, num_classes, kernel_size=3, padding=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 512-channel stride-4 concat [p5, p4, p3, p2] the classifier sees."""
        c2, c3, c4, c5 = self.backbone(x)
        p5 = self.top(c5)
        p4 = _upsample_like(p5, c4) + self.lateral4(c4)
        p3 = _upsample_like(p4, c3) + self.lateral3(c3)
        p2 = self.smooth2(_upsample_like(p3, c2) + self.lateral2(c2))
        size = (p2.shape[-2], p2.shape[-1])
        return torch.cat(
            [
                self.up5(self.smooth5(p5), size),
                self.up4(self.smooth4(p4), size),
                self.up3(self.smooth3(p3), size),
                p2,
            ],
            dim=1,
        )

    def forward(
        self,
        x: torch.Tensor,
        dropout_generator: torch.Generator | None = None,
        dropout_p: float = MC_DROPOUT_P,
    ) -> torch.Tensor:
        feats = self.features(x)
        if dropout_generator is not None and dropout_p > 0:
            keep = torch.rand(feats.shape, generator=dropout_generator, device=feats.device) >= dropout_p
            feats = feats * keep.to(feats.dtype) * (1.0 / (1.0 - dropout_p))
        logits = self.classifier(feats)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Re-initialise every weight and BN statistic, drawing only from ``generator``.

        Backbone convs: normal(0, sqrt(2 / (k*k*out_channels))) and BN weight 1 / bias 0, as the
        reference ResNet. The FPN head convs keep PyTorch's default init in the reference, so they
        get the same distribution here (kaiming-uniform a=sqrt(5), bias U(+-1/sqrt(fan_in))) but
        from ``generator``, which makes the network a function of the seed alone.
        """
        for m in self.backbone.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n), generator=generator)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self._head_convs():
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
            if m.bias is not None:
                fan_in = m.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(m.bias, -bound, bound, generator=generator)

    def _head_convs(self) -> Iterator[nn.Conv2d]:
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv2d) and not name.startswith("backbone."):
                yield m


def build_fpn(
    num_classes: int,
    generator: torch.Generator | None = None,
    layers: tuple[int, int, int, int] = RESNET50_LAYERS,
) -> FPNResNet50:
    """An initialised FPN-ResNet-50 on the CPU whose weights depend on ``generator`` only.

    Modules are created on the meta device (no allocation, no draw from the global RNG) and then
    initialised by ``reset_parameters``, so building the network never perturbs ``torch``'s
    global random state that other code may rely on.
    """
    with torch.device("meta"):
        model = FPNResNet50(num_classes, layers)
    model.to_empty(device="cpu")
    model.reset_parameters(generator)
    return model


def _backbone_state_keys(model: FPNResNet50) -> dict[str, torch.Tensor]:
    return dict(model.backbone.state_dict())


def load_imagenet_backbone(model: FPNResNet50, path: str | os.PathLike[str]) -> list[str]:
    """Copy a torchvision-format ResNet-50 state dict (e.g. ``resnet50-19c8e357.pth``) into the backbone.

    Only a local file the user names is read (no download). Accepted layouts: the plain state dict,
    or a checkpoint dict holding it under ``"state_dict"`` / ``"model"``; a ``"module."`` prefix (from
    DataParallel) is stripped. ``fc.*`` is ignored, and ``num_batches_tracked`` buffers are optional
    (old torchvision files lack them). Returns the list of backbone keys loaded.

    Raises ``FileNotFoundError`` if the file is missing and ``ConfigError`` naming the missing,
    unexpected or wrongly shaped keys, so a wrong file (ResNet-101, a segmentation checkpoint) fails
    loudly instead of half-loading.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"ImageNet ResNet-50 weights not found: {file} (no download is attempted)")
    raw = torch.load(file, map_location="cpu", weights_only=True)
    state = _unwrap_state(raw, file)
    own = _backbone_state_keys(model)
    given = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing = sorted(k for k in own if k not in given and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in given if k not in own)
    wrong_shape = sorted(
        f"{k}: file {tuple(given[k].shape)} vs model {tuple(own[k].shape)}"
        for k in given
        if k in own and tuple(given[k].shape) != tuple(own[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s), e.g. {missing[:5]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:5]}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} shape mismatch(es), e.g. {wrong_shape[:3]}")
    if problems:
        raise ConfigError(f"{file} is not a torchvision-format ResNet-50 state dict: " + "; ".join(problems))
    with torch.no_grad():
        for k, v in given.items():
            target = own[k]
            target.copy_(v.to(dtype=target.dtype))
    return sorted(given)


def _unwrap_state(raw: object, file: Path) -> Mapping[str, torch.Tensor]:
    if isinstance(raw, Mapping):
        for key in ("state_dict", "model"):
            inner = raw.get(key)
            if isinstance(inner, Mapping) and not isinstance(raw.get("conv1.weight"), torch.Tensor):
                raw = inner
                break
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ConfigError(f"{file} does not hold a state dict (a mapping of names to tensors)")
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in raw.items()}
