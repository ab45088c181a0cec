"""Models: the seed's small CNN, and ResNet-18 with GroupNorm (per-sample gradients need no BatchNorm)."""

import torch
from torch import nn


class SimpleModel(nn.Module):
    """The seed report's CNN: 95,110 parameters on MNIST (1x28x28, 10 classes), 133,000 on CIFAR-100."""

    def __init__(self, in_channels=1, num_classes=10):
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
                nn.init.zeros_(module.bias)

    def forward(self, x):
        return self.net(x)


def resnet18(in_channels=3, num_classes=100, groups=1):
    """torchvision's resnet18, every BatchNorm replaced by GroupNorm(groups, C), the seed's conv1."""
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)

    def swap(module):
        for name, child in module.named_children():
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, name, nn.GroupNorm(groups, child.num_features))
            else:
                swap(child)

    swap(model)
    return model


def build_model(name, in_channels, num_classes, seed=0, groups=1):
    torch.manual_seed(seed)
    if name == "simple":
        return SimpleModel(in_channels, num_classes)
    if name == "resnet18":
        return resnet18(in_channels, num_classes, groups)
    raise ValueError(f"unknown model {name!r}; choose 'simple' or 'resnet18'")
