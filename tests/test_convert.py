"""convert(): depthlab ResNets and torchvision-layout ResNets to SkipInit / Fixup / others."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import depthlab as dl
from depthlab.nn.residual import residual_blocks

pytestmark = pytest.mark.filterwarnings("ignore:TF32 acceleration")  # from mkldnn.flags


@pytest.fixture(autouse=True)
def _native_conv():
    """Tiny convs: oneDNN's per-call primitive setup costs more than native kernels here."""
    with torch.backends.mkldnn.flags(enabled=False):
        yield


# -- a ResNet with torchvision's module layout and forward (torchvision itself is optional) -----


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    """torchvision.models.ResNet's layout: conv1 bn1 relu maxpool layer1.. avgpool fc."""

    def __init__(self, block, layers, num_classes=10, width=8):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def tiny(block) -> nn.Module:
    return TinyResNet(block, [2, 2])


X = lambda: torch.randn(4, 3, 16, 16)  # noqa: E731


def _assert_blocks_are_identity(model: nn.Module, x: torch.Tensor) -> None:
    """Every block returns its (post-activated) skip path exactly."""
    blocks = residual_blocks(model)
    assert blocks
    seen = {}
    hooks = [
        b.register_forward_hook(lambda m, i, o: seen.__setitem__(m, (i[0], o))) for b in blocks
    ]
    model(x)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for blk in blocks:
            inp, out = seen[blk]
            expected = inp if blk.shortcut is None else blk.shortcut(inp)
            if blk.post is not None:  # converted post-activation blocks: relu(skip + 0)
                expected = blk.post(expected)
            assert torch.equal(out, expected)


def _no_batchnorm(model: nn.Module) -> bool:
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _trains(model: nn.Module, x: torch.Tensor, steps: int = 12, lr: float = 0.03) -> None:
    """A few SGD steps on one random batch lower the loss."""
    y = torch.randint(0, 10, (x.shape[0],))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses


# -- depthlab models ------------------------------------------------------------------------------


def test_convert_depthlab_resnet_to_skipinit():
    bn = dl.create_model("resnet", depth=8, scheme="batchnorm", in_channels=3)
    net = dl.convert(bn, "skipinit")
    assert net is not bn and net.scheme.name == "skipinit" and net.config == bn.config
    assert _no_batchnorm(net) and not _no_batchnorm(bn)
    x = torch.randn(4, 3, 8, 8)
    _assert_blocks_are_identity(net, x)
    _trains(net, x)


def test_convert_depthlab_model_in_place_with_options():
    net = dl.create_model("mlp", depth=3, width=8, scheme="plain")
    same = dl.convert(net, "skipinit", inplace=True, alpha_init="1/sqrt(d)")
    assert same is net and net.scheme.name == "skipinit"
    assert [b.gate.alpha.item() for b in net.blocks] == pytest.approx([3**-0.5] * 3)


# -- torchvision-layout ResNets -----------------------------------------------------------------


@pytest.mark.parametrize("block", [BasicBlock, Bottleneck])
def test_convert_torchvision_layout_to_skipinit(block):
    model = tiny(block)
    net = dl.convert(model, "skipinit")
    assert net is not model and not _no_batchnorm(model)  # a copy; the original is untouched
    assert _no_batchnorm(net)
    blocks = residual_blocks(net)
    assert len(blocks) == 4 and all(b.gate.alpha.item() == 0.0 for b in blocks)
    convs = [c for b in blocks for c in b.branch.modules() if isinstance(c, nn.Conv2d)]
    assert len(convs) == 4 * (3 if block is Bottleneck else 2)
    assert all(c.bias is not None for c in convs)  # biases in place of BN's β
    assert net.conv1.bias is not None
    x = X()
    _assert_blocks_are_identity(net, x)
    _trains(net, x)


@pytest.mark.parametrize("block", [BasicBlock, Bottleneck])
def test_convert_torchvision_layout_to_fixup(block):
    net = dl.convert(tiny(block), "fixup")
    assert _no_batchnorm(net)
    assert torch.equal(net.fc.weight, torch.zeros_like(net.fc.weight))
    blocks = residual_blocks(net)
    seen = {}
    for b in blocks:
        b.branch.register_forward_hook(lambda m, i, o: seen.__setitem__(m, o))
    x = X()
    logits = net(x)
    assert torch.equal(logits, torch.zeros_like(logits))
    for b in blocks:
        assert torch.equal(seen[b.branch], torch.zeros_like(seen[b.branch]))
        assert sum(isinstance(m, dl.Bias) for m in b.branch) == 2 * (
            3 if block is Bottleneck else 2
        )
    _assert_blocks_are_identity(net, x)
    _trains(net, x)


def test_convert_torchvision_layout_to_batchnorm_keeps_its_norms():
    model = tiny(BasicBlock)
    net = dl.convert(model, "batchnorm", inplace=True)
    assert net is model
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 1 + 4 * 2 + 1  # stem, two per block, the projection's
    out = net(X())
    assert torch.isfinite(out).all() and out.abs().sum() > 0


# -- timm's layout: act_layer, deep stems, stochastic depth (timm itself is optional) ------------


class DropPath(nn.Module):
    """timm's DropPath: zero the whole branch of a sample with probability p in training, scale
    the others by 1/(1−p)."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = (torch.rand(x.shape[0], *([1] * (x.dim() - 1))) >= self.p).to(x.dtype)
        return x * keep / (1 - self.p) if self.p < 1 else x * 0


class TimmBasicBlock(nn.Module):
    """timm's BasicBlock: conv1 bn1 drop_block act1 aa conv2 bn2 se drop_path (+ shortcut) act2."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, act=nn.SiLU, drop=0.0):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(inplanes, planes, stride), nn.BatchNorm2d(planes)
        self.drop_block, self.act1, self.aa = nn.Identity(), act(inplace=True), nn.Identity()
        self.conv2, self.bn2 = conv3x3(planes, planes), nn.BatchNorm2d(planes)
        self.se, self.act2 = None, act(inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath(drop) if drop > 0 else None

    def forward(self, x):
        shortcut = x
        x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
        x = self.bn2(self.conv2(x))
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return self.act2(x + shortcut)


class TimmDeepStemResNet(nn.Module):
    """timm's ``resnet*d`` layout: a deep stem (conv-bn-act ×2, conv) then bn1 act1 maxpool, and
    average-pool downsampling; ``act`` the act_layer everywhere."""

    def __init__(self, act=nn.SiLU, drop=0.0, width=8):
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width // 2), act(inplace=True),
            nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False),
            nn.BatchNorm2d(width // 2), act(inplace=True),
            nn.Conv2d(width // 2, width, 3, padding=1, bias=False),
        )  # fmt: skip
        self.bn1, self.act1 = nn.BatchNorm2d(width), act(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        down = nn.Sequential(
            nn.AvgPool2d(2, 2),
            nn.Conv2d(width, 2 * width, 1, bias=False),
            nn.BatchNorm2d(2 * width),
        )
        self.layer1 = nn.Sequential(*[TimmBasicBlock(width, width, act=act, drop=drop)] * 1)
        self.layer2 = nn.Sequential(
            TimmBasicBlock(width, 2 * width, 2, down, act=act, drop=drop),
            TimmBasicBlock(2 * width, 2 * width, act=act, drop=drop),
        )
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x):
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.global_pool(x), 1))


@pytest.mark.parametrize("scheme", ["skipinit", "fixup", "rezero"])
def test_convert_timm_deep_stem_silu_keeps_its_activation_and_leaves_no_norm(scheme):
    torch.manual_seed(0)
    model = TimmDeepStemResNet(act=nn.SiLU)
    n_silu = sum(isinstance(m, nn.SiLU) for m in model.modules())
    net = dl.convert(model, scheme)
    assert _no_batchnorm(net)  # the deep stem's two norms and bn1 included
    assert sum(isinstance(m, nn.SiLU) for m in net.modules()) == n_silu
    assert not any(isinstance(m, nn.ReLU) for m in net.modules())  # none slipped in
    for b in residual_blocks(net):
        assert isinstance(b.post, nn.SiLU) and not b.post.inplace
    x = X()
    _assert_blocks_are_identity(net, x)  # each block: silu(shortcut(x)), its own forward at α = 0
    _trains(net, x, steps=40)


def test_convert_keeps_stochastic_depth_on_the_branch():
    torch.manual_seed(0)
    net = dl.convert(TimmDeepStemResNet(act=nn.ReLU, drop=1.0), "skipinit")
    blocks = residual_blocks(net)
    assert all(isinstance(b.branch[-1], DropPath) for b in blocks)
    with torch.no_grad():
        for b in blocks:
            b.gate.alpha.fill_(0.7)
    x = X()
    seen = {}
    for b in blocks:
        b.register_forward_hook(lambda m, i, o: seen.__setitem__(m, (i[0], o)))
    net.train()
    net(x)
    for b in blocks:  # p = 1: every branch dropped, the block is act(shortcut(x))
        inp, out = seen[b]
        skip = inp if b.shortcut is None else b.shortcut(inp)
        torch.testing.assert_close(out, b.post(skip))
    net.eval()
    net(x)
    b = blocks[0]
    inp, out = seen[b]
    assert not torch.allclose(out, b.post(inp))  # in eval the branch counts


def test_convert_refuses_a_norm_it_does_not_know_and_leaves_the_model_unchanged():
    model = TimmDeepStemResNet(act=nn.ReLU)
    model.fc = nn.Sequential(nn.BatchNorm1d(16), nn.Linear(16, 10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(dl.DepthlabError, match=r"fc\.0 \(BatchNorm1d\).*unchanged"):
        dl.convert(model, "skipinit", inplace=True)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(model.layer1[0], TimmBasicBlock)


def test_convert_refuses_models_without_residual_blocks():
    with pytest.raises(dl.DepthlabError, match="Sequential has no residual blocks"):
        dl.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), "skipinit")


def test_convert_refuses_unknown_schemes():
    with pytest.raises(dl.DepthlabError, match="unknown scheme 'skip'.*skipinit"):
        dl.convert(tiny(BasicBlock), "skip")


@pytest.mark.real
@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None,
    reason="torchvision is not installed (optional extra 'vision'); the torchvision-layout "
    "tests above cover the same module structure",
)
def test_convert_real_torchvision_resnet18():
    import torchvision

    net = dl.convert(torchvision.models.resnet18(num_classes=10), "skipinit")
    assert _no_batchnorm(net) and len(residual_blocks(net)) == 8
    _assert_blocks_are_identity(net, torch.randn(2, 3, 64, 64))
