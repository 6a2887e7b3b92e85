"""TwistNet: a network of your own for mlexp, and an ablation variant without its new module."""

import torch
from torch import nn


class Twist(nn.Module):
    """The new module: a depthwise 3x3 'twist' whose output is mixed back into its input."""

    def __init__(self, channels: int):
        super().__init__()
        self.twist = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.mix = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return x + self.mix(torch.relu(self.twist(x)))


class TwistNet(nn.Module):
    def __init__(self, num_classes=1000, in_chans=3, width=16, twist=True):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, 2, 1), nn.BatchNorm2d(2 * width), nn.ReLU())
        self.twist = Twist(2 * width) if twist else nn.Identity()
        self.layer2 = nn.Sequential(nn.Conv2d(2 * width, 4 * width, 3, 2, 1), nn.BatchNorm2d(4 * width), nn.ReLU())
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.layer2(self.twist(self.layer1(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def twistnet_tiny(num_classes=1000, in_chans=3, **kwargs):
    return TwistNet(num_classes, in_chans)


def twistnet_tiny_no_twist(num_classes=1000, in_chans=3, **kwargs):
    """The ablation: the same network without its twist module."""
    return TwistNet(num_classes, in_chans, twist=False)
