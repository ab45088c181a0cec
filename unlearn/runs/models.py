"""Models: the seed's small CNN, and ResNet-18 with GroupNorm (per-sample gradients need no BatchNorm)."""

import torch
from torch import nn

from ..errors import RunConfigError


class SimpleModel(nn.Module):
    """The seed report's CNN: 95,110 parameters on MNIST (1x28x28, 10 classes), 133,000 on CIFAR-100."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 100, 3, stride=2, padding=1),
            nn.LeakyReLU(0.1),
            nn.Conv2d(100, 100, 3, stride=2, padding=1),
            nn.LeakyReLU(0.1),
            nn.AdaptiveMaxPool2d(2),
            nn.Flatten(),
            nn.Linear(400, num_classes),
        )
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_normal_(module.weight)
                if module.bias is not None:  # every one of them has a bias
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def resnet18(in_channels: int = 3, num_classes: int = 100, groups: int = 1) -> nn.Module:
    """torchvision's resnet18, every BatchNorm replaced by GroupNorm(groups, C), the seed's conv1."""
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)

    def swap(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, name, nn.GroupNorm(groups, child.num_features))
            else:
                swap(child)

    swap(model)
    return model


def build_model(name: str, in_channels: int, num_classes: int, seed: int = 0, groups: int = 1) -> nn.Module:
    """A run's model, its weights drawn from ``seed``."""
    torch.manual_seed(seed)
    if name == "simple":
        return SimpleModel(in_channels, num_classes)
    if name == "resnet18":
        return resnet18(in_channels, num_classes, groups)
    raise RunConfigError(f"unknown model {name!r}; choose 'simple' or 'resnet18'")
