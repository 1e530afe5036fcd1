"""Built-in models: a fast CPU CNN, and timm backbones adapted to 32x32 inputs."""
from __future__ import annotations

from torch import nn

from signtrap.plugins import register_model


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class ImageStandardize(nn.Module):
    """Per-image contrast normalisation: many GTSRB photos are very dark or washed out."""

    def forward(self, x):
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True)
        return (x - mean) / (std + 1e-3)


class SignNet(nn.Module):
    """Five 3x3 conv layers, pooled early: ~2k training images/s on two CPU cores at 32x32."""

    def __init__(self, num_classes: int, widths=(32, 64, 128), dropout: float = 0.2):
        super().__init__()
        a, b, c = widths
        self.features = nn.Sequential(
            ImageStandardize(),
            conv_bn(3, a), nn.MaxPool2d(2),
            conv_bn(a, b), conv_bn(b, b), nn.MaxPool2d(2),
            conv_bn(b, c), conv_bn(c, c),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c, num_classes))

    def forward(self, x):
        return self.head(self.pool(self.features(x)))


@register_model
def signnet(num_classes: int, dropout: float = 0.2) -> nn.Module:
    return SignNet(num_classes, (32, 64, 128), dropout)


@register_model
def signnet_small(num_classes: int, dropout: float = 0.1) -> nn.Module:
    return SignNet(num_classes, (16, 32, 64), dropout)


@register_model
def resnet18(num_classes: int, dropout: float = 0.0) -> nn.Module:
    """timm ResNet-18 with the CIFAR-style stem: 3x3 stride-1 first conv and no max-pool."""
    import timm

    model = timm.create_model("resnet18", pretrained=False, num_classes=num_classes, drop_rate=dropout)
    model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


@register_model
def mobilenetv3_small_100(num_classes: int, dropout: float = 0.0) -> nn.Module:
    """timm MobileNetV3-Small with a stride-1 stem, so 32x32 inputs keep spatial detail."""
    import timm

    model = timm.create_model("mobilenetv3_small_100", pretrained=False, num_classes=num_classes, drop_rate=dropout)
    model.conv_stem.stride = (1, 1)
    return model
