"""CIFAR ResNets with option-A (parameter-free, zero-padding) shortcuts.

Layout and parameter names follow the CHIP / HRank reference code (docs/method.md section 8), so the
paper's checkpoints load unchanged: ``conv1``, ``bn1``, ``layer{1,2,3}.{b}.conv{1,2}``,
``layer*.{b}.bn{1,2}`` and a final ``fc`` (ResNet-20/32/44/56) or ``linear`` (ResNet-110).

The reference implements the stage-boundary shortcut as a lambda; here it is
:class:`PadShortcut`, a real module holding index buffers, so that it can be scripted, exported
and pruned (a pruner shrinks ``src`` / ``dst`` and the channel counts).

Each depth is registered with its sparsity-string layout (:func:`sparsity_layout`) and, for the
depths the reference code scores (56, 110), its CI hook points (:func:`reference_hook_points`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from chip.models.registry import IgnoredRate, SparsityLayout, register_model

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "PadShortcut",
    "reference_hook_points",
    "resnet_cifar",
    "sparsity_layout",
]


class PadShortcut(nn.Module):
    """Option-A shortcut: spatial subsampling plus zero padding on the channel axis.

    Output channel ``dst[j]`` receives input channel ``src[j]``; every other output channel is
    zero. At construction ``src = arange(in_channels)`` and
    ``dst = src + (out_channels - in_channels) // 2``, which equals the reference's
    ``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad))``. Both buffers are non-persistent (not in
    the state_dict), so reference checkpoints load unchanged.

    A pruner may shrink ``src``, ``dst``, ``in_channels`` and ``out_channels``; :meth:`forward`
    uses nothing else.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(
                f"PadShortcut needs out_channels >= in_channels, got {in_channels} -> {out_channels}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        src = torch.arange(in_channels, dtype=torch.long)
        self.register_buffer("src", src, persistent=False)
        self.register_buffer("dst", src + (out_channels - in_channels) // 2, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        out = x.new_zeros((x.shape[0], self.out_channels, x.shape[2], x.shape[3]))
        return out.index_copy(1, self.dst, x.index_select(1, self.src))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    """conv1 -> bn1 -> relu1 -> conv2 -> bn2, + shortcut(x), -> relu2 (3x3 convs, no bias)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = PadShortcut(in_planes, planes, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.relu2(out)


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs, depth ``6n + 2`` (three stages of ``n`` BasicBlocks).

    Args:
        depth: 20, 32, 44, 56, 110, ... (``(depth - 2) % 6 == 0``).
        num_classes: classifier outputs.
        in_channels: input image channels.
        head_name: attribute name of the final Linear (``"fc"`` or ``"linear"``, as in the
            reference checkpoints).
    """

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        in_channels: int = 3,
        head_name: str = "fc",
    ) -> None:
        super().__init__()
        if head_name not in ("fc", "linear"):
            raise ValueError(f"head_name must be 'fc' or 'linear', got {head_name!r}")
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.head_name = head_name
        self.in_planes = 16
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, n, stride=1)
        self.layer2 = self._make_layer(32, n, stride=2)
        self.layer3 = self._make_layer(64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        setattr(self, head_name, nn.Linear(64 * BasicBlock.expansion, num_classes))
        self._init_weights()

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes * BasicBlock.expansion
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        """Kaiming-normal convs (fan_out, ReLU) and unit BN, as the reference does."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Linear:
        """The final Linear, whatever its attribute name (``fc`` or ``linear``)."""
        return getattr(self, self.head_name)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and the three stages: the last feature map (N, 64, H/4, W/4)."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        return self.layer3(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pool, flatten and the final Linear."""
        x = self.flatten(self.avgpool(x))
        # hasattr on a module attribute is resolved statically by TorchScript
        if hasattr(self, "linear"):
            return self.linear(x)
        return self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def resnet_cifar(depth: int, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """A CIFAR ResNet of the given depth, with the reference's head name for that depth."""
    head_name = "linear" if depth == 110 else "fc"
    return CifarResNet(depth, num_classes, in_channels, head_name=head_name)


def sparsity_layout(n: int) -> SparsityLayout:
    """Sparsity-string layout of a CIFAR ResNet with ``n`` blocks per stage (docs/method.md section 3).

    ``[stem, stage-1 stream, stage-2 stream, one inner rate per block]`` (``3 + 3n`` rates). The
    stem conv writes the stage-1 residual stream, so the stem and the stage-1 stream are one
    coupled group (named ``conv1``) that takes the *stage-1 stream* rate (position 1); the stem
    rate (position 0) is ignored, with a warning when it is non-zero and differs. The stage-2
    stream is the group of ``layer2.0.conv2``; the last stream is never pruned, as in the paper.
    The inner rate of block ``b`` of stage ``s`` prunes ``layer{s}.{b}.conv1``.
    """
    inner = [[f"layer{s}.{b}.conv1"] for s in (1, 2, 3) for b in range(n)]
    return SparsityLayout(
        positions=[[], ["conv1"], ["layer2.0.conv2"]] + inner,
        help=f"stem, stage-1 and stage-2 stream rates, one inner rate per block ({3 * n})",
        ignored=(
            IgnoredRate(
                position=0,
                follows=1,
                warning="stem rate {rate} ignored: the stem writes the stage-1 residual stream, a "
                "coupled group that takes the stage-1 rate {follows_rate}",
            ),
        ),
    )


def reference_hook_points(n: int) -> list[str]:
    """The reference code's CI hook points (``ci_conv1``, ``ci_conv2``, ...) for ``n`` blocks per
    stage: the stem's ReLU, then ``relu1`` (inner) and ``relu2`` (block output) of every block."""
    return ["relu"] + [f"layer{s}.{b}.relu{k}" for s in (1, 2, 3) for b in range(n) for k in (1, 2)]


# The reference code computes CI (ci_conv{k}.npy) for ResNet-56 and ResNet-110 only; the other
# depths take sparsity strings but have no reference hook points.
@register_model(sparsity=sparsity_layout(3))
def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-20 (n=3), a small model for tests and demos."""
    return resnet_cifar(20, num_classes, in_channels)


@register_model(sparsity=sparsity_layout(5))
def resnet32(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-32 (n=5)."""
    return resnet_cifar(32, num_classes, in_channels)


@register_model(sparsity=sparsity_layout(7))
def resnet44(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-44 (n=7)."""
    return resnet_cifar(44, num_classes, in_channels)


@register_model(sparsity=sparsity_layout(9), reference_points=reference_hook_points(9))
def resnet56(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-56 (n=9), head ``fc``: 853,018 parameters for 10 classes."""
    return resnet_cifar(56, num_classes, in_channels)


@register_model(sparsity=sparsity_layout(18), reference_points=reference_hook_points(18))
def resnet110(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-110 (n=18), head ``linear``: 1,727,962 parameters for 10 classes."""
    return resnet_cifar(110, num_classes, in_channels)
