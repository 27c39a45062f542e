"""The running-example networks.

* :class:`MnistCNN` - a compact depthwise-separable (MobileNet-style) CNN for 28x28
  digits, about 9k parameters. Jacob et al. (2018) stress that quantizing an already
  efficient network is the meaningful test: there is little redundancy to hide the
  error in.
* :class:`Mnist1DCNN` - a small 1-D CNN for MNIST-1D sequences (length 40).
* :class:`Mnist1DResNet` - a small residual 1-D CNN for the same data: the running example for
  residual adds in integers and for block-wise reconstruction (chapter 9).
* :func:`resnet20` - the CIFAR-style ResNet-20 of He et al. (2016) (0.27M parameters),
  the network of the ``full`` setting and of most papers' CIFAR-10 tables.

Every ReLU is its own module, so that hooks and quantizers can be attached to each
activation separately, and every conv/linear layer that feeds a batch norm has no bias
(the batch norm's shift takes that role, and folding puts it back).
"""

from __future__ import annotations

from torch import nn

from ._checks import check_int

__all__ = ["conv_bn_relu", "MnistCNN", "Mnist1DCNN", "Mnist1DResNet", "BasicBlock", "ResNetCifar", "resnet20",
           "build_model", "count_parameters", "MODELS"]


def conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, dims: int = 2) -> nn.Sequential:
    """Convolution (no bias) -> batch norm -> ReLU, with 'same' padding for odd kernels."""
    conv = (nn.Conv2d if dims == 2 else nn.Conv1d)(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
    norm = (nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d)(cout)
    return nn.Sequential(conv, norm, nn.ReLU())


class MnistCNN(nn.Module):
    """Depthwise-separable CNN for 1x28x28 inputs.

    stem 3x3 conv (``widths[0]`` channels), then three blocks of depthwise 3x3
    (stride 2) + pointwise 1x1, global average pooling and a linear classifier::

        28x28x1 -> 28x28x16 -> 14x14x32 -> 7x7x64 -> 4x4x64 -> 64 -> 10
    """

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64, 64), in_channels: int = 1):
        super().__init__()
        num_classes = check_int(num_classes, "num_classes", 2)
        widths = tuple(check_int(w, "widths[i]", 1) for w in widths)
        if len(widths) < 2:
            raise ValueError(f"widths needs at least two entries (stem and one block), got {widths}")
        layers = [conv_bn_relu(check_int(in_channels, "in_channels", 1), widths[0], 3)]
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers.append(conv_bn_relu(cin, cin, 3, stride=2, groups=cin))  # depthwise
            layers.append(conv_bn_relu(cin, cout, 1))  # pointwise
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        return self.classifier(self.flatten(self.pool(self.features(x))))


class Mnist1DCNN(nn.Module):
    """1-D CNN for ``(N, 1, 40)`` MNIST-1D sequences: four convolutions, then a linear layer.

    ``40 -> 40 -> 20 -> 10 -> 5`` positions with ``width`` channels, flattened into the
    classifier (position matters in MNIST-1D, so no global pooling). ``widths`` (four channel
    counts, one per convolution) replaces ``width`` for networks whose layers differ, such as
    the architectures a width search derives (chapter 11).
    """

    def __init__(self, num_classes: int = 10, width: int = 32, length: int = 40,
                 widths: tuple | list | None = None):
        super().__init__()
        if widths is None:
            widths = (check_int(width, "width", 1),) * 4
        else:
            if not isinstance(widths, (tuple, list)) or len(widths) != 4:
                raise ValueError(f"widths must be four channel counts, one per convolution, got {widths!r}")
            widths = tuple(check_int(w, "widths[i]", 1) for w in widths)
        self.widths = widths
        length = check_int(length, "length", 8)
        inputs = (1,) + widths[:-1]
        self.features = nn.Sequential(*[
            conv_bn_relu(cin, cout, 5 if i == 0 else 3, stride=1 if i == 0 else 2, dims=1)
            for i, (cin, cout) in enumerate(zip(inputs, widths))
        ])
        out_length = length
        for _ in range(3):
            out_length = (out_length + 1) // 2
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(widths[-1] * out_length, check_int(num_classes, "num_classes", 2))

    def forward(self, x):
        return self.classifier(self.flatten(self.features(x)))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN, a shortcut (1x1 conv-BN when the shape changes), add, ReLU.

    ``dims=1`` builds the same block from ``Conv1d``/``BatchNorm1d`` (kernel 3) for sequences.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, dims: int = 2):
        super().__init__()
        if dims not in (1, 2):
            raise ValueError(f"dims must be 1 or 2, got {dims!r}")
        conv, norm = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv1d, nn.BatchNorm1d)
        self.conv1 = conv(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = conv(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(conv(cin, cout, 1, stride, bias=False), norm(cout))
        self.relu2 = nn.ReLU()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class Mnist1DResNet(nn.Module):
    """A small residual 1-D CNN for ``(N, 1, 40)`` MNIST-1D sequences, about 14k parameters.

    A stem convolution (kernel 5), ``len(strides)`` basic blocks (:class:`BasicBlock`, ``dims=1``),
    then a linear layer on the flattened positions. With the default strides ``(1, 2, 2)`` the
    first block adds its input unchanged (identity shortcut) and the others through a strided 1x1
    convolution, so both kinds of residual add occur::

        40 x 1 -> 40 x width (stem) -> 40 -> 20 -> 10 positions x width -> 10
    """

    def __init__(self, num_classes: int = 10, width: int = 24, strides: tuple[int, ...] = (1, 2, 2),
                 length: int = 40):
        super().__init__()
        width = check_int(width, "width", 1)
        length = check_int(length, "length", 8)
        strides = tuple(check_int(s, "strides[i]", 1) for s in strides)
        if not strides:
            raise ValueError("strides needs at least one entry (one block)")
        self.stem = conv_bn_relu(1, width, 5, dims=1)
        self.blocks = nn.Sequential(*[BasicBlock(width, width, s, dims=1) for s in strides])
        out_length = length
        for s in strides:
            out_length = (out_length - 1) // s + 1
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(width * out_length, check_int(num_classes, "num_classes", 2))

    def forward(self, x):
        return self.classifier(self.flatten(self.blocks(self.stem(x))))


class ResNetCifar(nn.Module):
    """CIFAR ResNet (He et al. 2016, sec. 4.2): 3 stages of ``n`` blocks with 16/32/64 channels."""

    def __init__(self, blocks_per_stage: int = 3, num_classes: int = 10, widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        n = check_int(blocks_per_stage, "blocks_per_stage", 1)
        self.stem = conv_bn_relu(3, widths[0], 3)
        stages, cin = [], widths[0]
        for i, cout in enumerate(widths):
            for j in range(n):
                stages.append(BasicBlock(cin, cout, stride=2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(cin, check_int(num_classes, "num_classes", 2))

    def forward(self, x):
        return self.classifier(self.flatten(self.pool(self.stages(self.stem(x)))))


def resnet20(num_classes: int = 10) -> ResNetCifar:
    """ResNet-20 for 32x32 images: 1 + 3 * 3 * 2 + 1 = 20 weighted layers."""
    return ResNetCifar(3, num_classes)


#: The running-example networks by name, for :func:`build_model` and :func:`qlib.train.pretrained`.
MODELS = {"mnist_cnn": MnistCNN, "mnist1d_cnn": Mnist1DCNN, "mnist1d_resnet": Mnist1DResNet, "resnet20": resnet20}


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a running-example network by name (see :data:`MODELS`)."""
    if name not in MODELS:
        raise ValueError(f"name must be one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name](**kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
