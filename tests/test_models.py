"""The running-example networks and batch-norm folding."""

import pytest
import torch
from torch import nn

from qlib import fold, models


@pytest.mark.parametrize("name, shape, params", [
    ("mnist_cnn", (1, 28, 28), (8_000, 12_000)),
    ("mnist1d_cnn", (1, 40), (9_000, 14_000)),
    ("mnist1d_resnet", (1, 40), (12_000, 20_000)),
    ("resnet20", (3, 32, 32), (260_000, 280_000)),
])
def test_shapes_and_sizes(name, shape, params):
    model = models.build_model(name)
    assert model(torch.randn(2, *shape)).shape == (2, 10)
    assert params[0] <= models.count_parameters(model) <= params[1]


def test_resnet20_has_20_weighted_layers_on_the_main_path():
    model = models.resnet20()
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and "shortcut" not in n]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) + len(linears) == 20


def test_mnist1d_resnet_has_both_kinds_of_shortcut_and_adds_them():
    model = models.Mnist1DResNet().eval()
    blocks = list(model.blocks)
    assert [len(b.shortcut) for b in blocks] == [0, 2, 2]  # identity first, then strided 1x1 conv + BN
    x = torch.randn(3, 24, 40)
    block = blocks[0]
    main = block.bn2(block.conv2(block.relu1(block.bn1(block.conv1(x)))))
    assert torch.equal(block(x), torch.relu(main + x))
    with pytest.raises(ValueError, match="strides"):
        models.Mnist1DResNet(strides=())
    with pytest.raises(ValueError, match="dims"):
        models.BasicBlock(4, 4, dims=3)


def test_every_relu_is_a_separate_module():
    for name in models.MODELS:
        relus = [m for m in models.build_model(name).modules() if isinstance(m, nn.ReLU)]
        assert len({id(m) for m in relus}) == len(relus) > 1


@pytest.mark.parametrize("name, shape", [("mnist_cnn", (1, 28, 28)), ("mnist1d_cnn", (1, 40)),
                                         ("mnist1d_resnet", (1, 40)), ("resnet20", (3, 32, 32))])
def test_fold_batchnorm_preserves_outputs(name, shape):
    torch.manual_seed(0)
    model = models.build_model(name)
    model.train()
    for _ in range(3):  # give the batch norms nontrivial running statistics
        model(torch.randn(16, *shape) * 2 + 0.5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.uniform_(0.2, 3.0)
                m.bias.uniform_(-1, 1)
    model.eval()
    folded = fold.fold_batchnorm(model)
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in folded.modules())
    x = torch.randn(8, *shape)
    assert torch.allclose(folded(x), model(x), atol=1e-4, rtol=1e-4)
    assert any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in model.modules())  # original untouched


def test_fold_formula_on_one_layer():
    conv, bn = nn.Conv2d(2, 3, 3, bias=False), nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
        bn.weight.copy_(torch.tensor([1.0, 2.0, -0.5]))
        bn.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
    folded = fold.fold_batchnorm(nn.Sequential(conv, bn))[0]
    factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    assert torch.allclose(folded.weight, conv.weight * factor.reshape(-1, 1, 1, 1))
    assert torch.allclose(folded.bias, bn.bias - bn.running_mean * factor)


def test_bad_input():
    with pytest.raises(ValueError, match="does not follow a convolution"):
        fold.fold_batchnorm(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fold.fold_batchnorm("resnet")
    with pytest.raises(ValueError, match="name must be one of"):
        models.build_model("vgg16")
    with pytest.raises(ValueError, match="widths needs at least two entries"):
        models.MnistCNN(widths=(8,))
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        models.Mnist1DCNN(num_classes=1)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        models.count_parameters(None)


@pytest.mark.parametrize("dims, shape", [(1, (2, 4, 11)), (2, (2, 4, 9, 7))])
@pytest.mark.parametrize("kernel, stride", [(3, 1), (5, 2), (1, 1)])
def test_conv_bn_relu_keeps_size_and_is_conv_bn_relu(dims, shape, kernel, stride):
    block = models.conv_bn_relu(4, 6, kernel, stride=stride, dims=dims)
    conv, norm, act = block
    assert isinstance(conv, nn.Conv1d if dims == 1 else nn.Conv2d) and conv.bias is None
    assert isinstance(norm, nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d) and isinstance(act, nn.ReLU)
    out = block(torch.randn(shape))
    # 'same' padding: the spatial size only shrinks by the stride
    assert out.shape[:2] == (2, 6) and list(out.shape[2:]) == [-(-n // stride) for n in shape[2:]]
    assert (out >= 0).all()
    depthwise = models.conv_bn_relu(4, 4, 3, groups=4)[0]
    assert depthwise.weight.shape == (4, 1, 3, 3)


def test_mnist1d_cnn_per_layer_widths():
    torch.manual_seed(0)
    uniform = models.Mnist1DCNN(width=12)
    torch.manual_seed(0)
    same = models.Mnist1DCNN(widths=(12, 12, 12, 12))
    # the same network, drawn the same way: cached default networks keep their weights
    assert all(torch.equal(a, b) for a, b in zip(uniform.state_dict().values(), same.state_dict().values()))
    net = models.Mnist1DCNN(widths=[8, 16, 24, 40])
    convs = [block[0] for block in net.features]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 8), (8, 16), (16, 24), (24, 40)]
    assert net.classifier.in_features == 40 * 5 and net(torch.randn(3, 1, 40)).shape == (3, 10)
    with pytest.raises(ValueError, match="four channel counts"):
        models.Mnist1DCNN(widths=(8, 8, 8))
    with pytest.raises(ValueError, match="widths"):
        models.Mnist1DCNN(widths=(8, 0, 8, 8))
