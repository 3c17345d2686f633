"""Modules written the way real repositories write them, each reproducing one idiom that a
symbolic tracer cannot follow or one linear op written imperatively (our own code, not
copied from those repositories). Used by the reach tests.

Every builder returns ``(model, example_input, convs)``: the model in eval mode with random
weights and batch-norm statistics, and the number of convolutions its authors' own
conversion leaves."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------------- building blocks
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and realistic batch-norm statistics (any module holding running
    statistics, affine or not, buffers or parameters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            mean, var = getattr(m, "running_mean", None), getattr(m, "running_var", None)
            if not isinstance(mean, torch.Tensor) or not isinstance(var, torch.Tensor):
                continue
            c = mean.numel()
            mean.copy_(torch.randn(c, generator=g) * 0.3)
            var.copy_(torch.rand(c, generator=g) + 0.5)
            for name in ("weight", "bias"):
                t = getattr(m, name, None)
                if isinstance(t, torch.Tensor):
                    t.copy_(torch.randn(c, generator=g) * 0.3 + (name == "weight"))
    return model.eval()


class ConvBNAct(nn.Module):
    def __init__(self, c1, c2, k=1, s=1, act=True, norm=nn.BatchNorm2d):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = norm(c2)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class RepBlock(nn.Module):
    """conv3x3+bn + conv1x1+bn (+ bn identity), then ReLU: one 3x3 conv once fused."""

    def __init__(self, c1, c2=None, s=1, norm=nn.BatchNorm2d):
        super().__init__()
        c2 = c2 or c1
        self.k3 = nn.Sequential(nn.Conv2d(c1, c2, 3, s, 1, bias=False), norm(c2))
        self.k1 = nn.Sequential(nn.Conv2d(c1, c2, 1, s, 0, bias=False), norm(c2))
        self.idn = norm(c1) if c1 == c2 and s == 1 else None
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.k3(x) + self.k1(x)
        if self.idn is not None:
            y = y + self.idn(x)
        return self.act(y)


# ---------------------------------------------------------------------- reach
class ListStage(nn.Module):
    """Untraceable parent holding its blocks in a ModuleList (C2f-style split and loop)."""

    def __init__(self, c, n=2):
        super().__init__()
        self.cv1 = ConvBNAct(c, 2 * c, 1)
        self.m = nn.ModuleList(RepBlock(c) for _ in range(n))
        self.cv2 = ConvBNAct((2 + n) * c, c, 1)

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


def list_stage():
    model = nn.Sequential(ConvBNAct(3, 8, 3, 2), ListStage(8, 2))
    return randomize(model), torch.randn(2, 3, 32, 32), 1 + 1 + 2 + 1


class Concat(nn.Module):
    def __init__(self, dim=1):
        super().__init__()
        self.d = dim

    def forward(self, xs):
        return torch.cat(xs, self.d)


class GridHead(nn.Module):
    """Untraceable detection head: writes into its input list and caches a grid per
    level, rebuilt when the feature map's size changes (shape-dependent control flow)."""

    def __init__(self, chs, no=6):
        super().__init__()
        self.m = nn.ModuleList(nn.Sequential(ConvBNAct(c, c, 3), nn.Conv2d(c, no, 1))
                               for c in chs)
        self.grid = [torch.zeros(0)] * len(chs)

    def forward(self, x):
        out = []
        for i in range(len(self.m)):
            x[i] = self.m[i](x[i])
            h, w = x[i].shape[2:]
            if self.grid[i].shape[-2:] != (h, w):
                ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
                self.grid[i] = torch.stack((xs, ys), 0).float()
            out.append(torch.cat((x[i][:, :2] + self.grid[i], x[i][:, 2:]), 1).flatten(2))
        return torch.cat(out, 2)


class Routed(nn.Module):
    """DetectionModel-style root: iterates an nn.Sequential (never calls it) and routes
    each layer's input by the layer's ``f`` attribute, keeping outputs listed in
    ``save``; a data-dependent input check makes it untraceable."""

    def __init__(self):
        super().__init__()
        spec = [(-1, ConvBNAct(3, 8, 3, 2)), (-1, RepBlock(8)), (-1, ConvBNAct(8, 16, 3, 2)),
                (-1, RepBlock(16)), (-1, nn.Upsample(scale_factor=2.0)),
                ([-1, 1], Concat()), (-1, ConvBNAct(24, 8, 1)), ([6, 3], GridHead([8, 16]))]
        layers = []
        for i, (f, m) in enumerate(spec):
            m.f, m.i, m.type = f, i, type(m).__name__
            layers.append(m)
        self.model = nn.Sequential(*layers)
        self.save = {1, 3, 6}

    def forward(self, x):
        if not torch.isfinite(x).all():
            raise ValueError("non-finite input")
        y = []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x


def routed():
    # per layer: 1, 1, 1, 1, -, -, 1, head 2 x (1 + 1)
    return randomize(Routed()), torch.randn(2, 3, 32, 32), 5 + 4


class TwoScale(nn.Module):
    """A traceable parent handing a list it builds to an untraceable head that writes into
    that list (a symbolic trace passes an immutable list)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = ConvBNAct(3, 8, 3, 2), RepBlock(8, 16, 2)
        self.head = GridHead([8, 16])

    def forward(self, x):
        p3 = self.a(x)
        return self.head([p3, self.b(p3)])


def mutated_list():
    return randomize(TwoScale()), torch.randn(2, 3, 32, 32), 2 + 4


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = RepBlock(3, 8, 2)
        self.s1 = nn.Sequential(RepBlock(8, 16, 2), RepBlock(16))
        self.s2 = nn.Sequential(RepBlock(16, 16, 2), RepBlock(16))

    def forward(self, x):
        x = self.stem(x)
        a = self.s1(x)
        return a, self.s2(a)


class Neck(nn.Module):
    def __init__(self):
        super().__init__()
        self.reduce = ConvBNAct(16, 8, 1)
        self.up = nn.Upsample(scale_factor=2.0)
        self.fuse = RepBlock(24, 8)

    def forward(self, feats):
        a, b = feats
        b = self.reduce(b)
        return [self.fuse(torch.cat((self.up(b), a), 1)), b]


class SimpleHead(nn.Module):
    def __init__(self, chs=(8, 8), no=6):
        super().__init__()
        self.stems = nn.ModuleList(ConvBNAct(c, c, 1) for c in chs)
        self.preds = nn.ModuleList(nn.Conv2d(c, no, 1) for c in chs)

    def forward(self, xs):
        return torch.cat([p(s(x)).flatten(2) for x, s, p in zip(xs, self.stems, self.preds)], 2)


class ExtendRoot(nn.Module):
    """YOLOv6-style root that keeps the neck's feature maps with ``list.extend``."""

    def __init__(self):
        super().__init__()
        self.backbone, self.neck, self.detect = Backbone(), Neck(), SimpleHead()

    def forward(self, x):
        x = self.backbone(x)
        x = self.neck(x)
        featmaps = []
        featmaps.extend(x)
        x = self.detect(x)
        return x, featmaps


def extend_root():
    # backbone 5 rep blocks, neck 2, head 2 stems + 2 preds
    return randomize(ExtendRoot()), torch.randn(2, 3, 32, 32), 5 + 2 + 4


# ---------------------------------------------------------------------- norm variants
def sync_bn():
    model = nn.Sequential(RepBlock(3, 8, 2, norm=nn.SyncBatchNorm),
                          RepBlock(8, norm=nn.SyncBatchNorm),
                          ConvBNAct(8, 8, 3, norm=nn.SyncBatchNorm))
    return randomize(model), torch.randn(2, 3, 16, 16), 3


class FrozenBottleneck(nn.Module):
    def __init__(self, c, norm):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 1, bias=False), norm(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), norm(c)
        self.down = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), norm(c))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.down(x))


def frozen_bn():
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = nn.Sequential(ConvBNAct(3, 8, 3, norm=FrozenBatchNorm2d),
                          FrozenBottleneck(8, FrozenBatchNorm2d))
    return randomize(model), torch.randn(2, 3, 16, 16), 4


def bn_variants():
    model = nn.Sequential(
        ConvBNAct(3, 8, 3, norm=lambda c: nn.BatchNorm2d(c, momentum=None)),
        ConvBNAct(8, 8, 3, norm=lambda c: nn.BatchNorm2d(c, affine=False)),
        RepBlock(8, norm=lambda c: nn.BatchNorm2d(c, momentum=None)))
    return randomize(model), torch.randn(2, 3, 16, 16), 3


class FunctionalBN(nn.Module):
    """A conv followed by ``F.batch_norm`` on the module's own buffers and parameters."""

    def __init__(self, c1, c2):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(c2, c1, 3, 3) * 0.2)
        self.gamma, self.beta = nn.Parameter(torch.ones(c2)), nn.Parameter(torch.zeros(c2))
        self.register_buffer("running_mean", torch.zeros(c2))
        self.register_buffer("running_var", torch.ones(c2))
        self.eps = 1e-3

    def forward(self, x):
        y = F.conv2d(x, self.kernel, None, 1, 1)
        y = F.batch_norm(y, self.running_mean, self.running_var, self.gamma, self.beta,
                         self.training, 0.03, self.eps)
        return F.silu(y)


def functional_bn():
    model = nn.Sequential(FunctionalBN(3, 8), FunctionalBN(8, 8))
    return randomize(model), torch.randn(2, 3, 16, 16), 2


# ---------------------------------------------------------------------- computed kernels
class GeneratedConv(nn.Module):
    """OREPA-style: the kernel is generated in forward from several parameter sets (a
    kxk kernel, a 1x1 kernel embedded at the centre, an average kernel, per-branch
    scales), then one conv and a BN."""

    def __init__(self, c1, c2, k=3):
        super().__init__()
        self.k = k
        self.w_kxk = nn.Parameter(torch.randn(c2, c1, k, k) * 0.2)
        self.w_1x1 = nn.Parameter(torch.randn(c2, c1, 1, 1) * 0.2)
        self.w_avg = nn.Parameter(torch.randn(c2, c1, 1, 1) * 0.2)
        self.register_buffer("avg", torch.full((k, k), 1.0 / (k * k)))
        self.vector = nn.Parameter(torch.rand(3, c2) + 0.5)
        self.bn = nn.BatchNorm2d(c2)

    def weight_gen(self):
        p = self.k // 2
        w = torch.einsum("oihw,o->oihw", self.w_kxk, self.vector[0])
        w = w + torch.einsum("oihw,o->oihw", F.pad(self.w_1x1, (p, p, p, p)), self.vector[1])
        w = w + torch.einsum("oi,hw,o->oihw", self.w_avg.squeeze(3).squeeze(2), self.avg,
                             self.vector[2])
        return w

    def forward(self, x):
        return F.relu(self.bn(F.conv2d(x, self.weight_gen(), None, 1, self.k // 2)))


def generated_conv():
    model = nn.Sequential(GeneratedConv(3, 8), GeneratedConv(8, 8))
    return randomize(model), torch.randn(2, 3, 16, 16), 2


class MaskedSeqConv(nn.Module):
    """ECB-style edge branch: a 1x1 conv, its output padded with its bias by slice
    assignment, then a depthwise 3x3 whose kernel is ``scale * mask`` (a fixed Sobel or
    Laplacian mask)."""

    def __init__(self, c, kind):
        super().__init__()
        self.k0 = nn.Parameter(torch.randn(c, c, 1, 1) * 0.3)
        self.b0 = nn.Parameter(torch.randn(c) * 0.1)
        self.scale = nn.Parameter(torch.randn(c, 1, 1, 1) * 0.3)
        self.bias = nn.Parameter(torch.randn(c) * 0.1)
        masks = {"sobelx": [[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]],
                 "laplacian": [[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]}
        mask = torch.tensor(masks[kind]).expand(c, 1, 3, 3).clone()
        self.mask = nn.Parameter(mask, requires_grad=False)
        self.c = c

    def forward(self, x):
        y0 = F.conv2d(x, self.k0, self.b0)
        y0 = F.pad(y0, (1, 1, 1, 1), "constant", 0)
        b0 = self.b0.view(1, -1, 1, 1)
        y0[:, :, 0:1, :] = b0
        y0[:, :, -1:, :] = b0
        y0[:, :, :, 0:1] = b0
        y0[:, :, :, -1:] = b0
        return F.conv2d(y0, self.scale * self.mask, self.bias, 1, 0, 1, self.c)


class EdgeBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv3x3 = nn.Conv2d(c, c, 3, 1, 1)
        self.sobelx = MaskedSeqConv(c, "sobelx")
        self.laplacian = MaskedSeqConv(c, "laplacian")
        self.act = nn.PReLU(c)

    def forward(self, x):
        return self.act(self.conv3x3(x) + self.sobelx(x) + self.laplacian(x) + x)


def masked_edges():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), EdgeBlock(8), EdgeBlock(8))
    return randomize(model), torch.randn(2, 3, 16, 16), 3


class BNAndPad(nn.Module):
    """DBB-style: a BN whose output is padded with the value the BN gives a zero input,
    written into the borders by slice assignment."""

    def __init__(self, c, pad):
        super().__init__()
        self.bn, self.pad = nn.BatchNorm2d(c), pad

    def forward(self, x):
        y = self.bn(x)
        p = self.pad
        if p > 0:
            v = self.bn.bias.detach() - self.bn.running_mean * self.bn.weight.detach() / \
                torch.sqrt(self.bn.running_var + self.bn.eps)
            y = F.pad(y, [p] * 4)
            v = v.view(1, -1, 1, 1)
            y[:, :, 0:p, :] = v
            y[:, :, -p:, :] = v
            y[:, :, :, 0:p] = v
            y[:, :, :, -p:] = v
        return y


class DiverseBlock(nn.Module):
    def __init__(self, c1, c2, k=3):
        super().__init__()
        p = k // 2
        self.origin = nn.Sequential(nn.Conv2d(c1, c2, k, 1, p, bias=False), nn.BatchNorm2d(c2))
        self.avg = nn.Sequential(nn.Conv2d(c1, c2, 1, bias=False), BNAndPad(c2, p),
                                 nn.AvgPool2d(k, 1, 0), nn.BatchNorm2d(c2))
        self.one = nn.Sequential(nn.Conv2d(c1, c2, 1, bias=False), nn.BatchNorm2d(c2))
        self.one_kxk = nn.Sequential(nn.Conv2d(c1, c2, 1, bias=False), BNAndPad(c2, p),
                                     nn.Conv2d(c2, c2, k, 1, 0, bias=False),
                                     nn.BatchNorm2d(c2))
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.origin(x) + self.avg(x) + self.one(x) + self.one_kxk(x))


def diverse_bn_and_pad():
    model = nn.Sequential(DiverseBlock(3, 8), DiverseBlock(8, 8))
    return randomize(model), torch.randn(2, 3, 16, 16), 2


class Crop(nn.Module):
    def __init__(self, rows, cols):
        super().__init__()
        self.rows, self.cols = rows, cols

    def forward(self, x):
        if self.rows == 0:
            return x[:, :, :, self.cols:-self.cols]
        if self.cols == 0:
            return x[:, :, self.rows:-self.rows, :]
        return x[:, :, self.rows:-self.rows, self.cols:-self.cols]


class AsymBlock(nn.Module):
    """ACB-style with padding smaller than k // 2: the 1xk and kx1 branches crop their
    input by slicing so that their outputs align with the kxk branch."""

    def __init__(self, c1, c2, k=3, padding=0):
        super().__init__()
        crop = k // 2 - padding
        self.square = nn.Sequential(nn.Conv2d(c1, c2, k, 1, padding, bias=False),
                                    nn.BatchNorm2d(c2))
        self.hor = nn.Sequential(Crop(crop, 0), nn.Conv2d(c1, c2, (1, k), 1, (0, padding),
                                                          bias=False), nn.BatchNorm2d(c2))
        self.ver = nn.Sequential(Crop(0, crop), nn.Conv2d(c1, c2, (k, 1), 1, (padding, 0),
                                                          bias=False), nn.BatchNorm2d(c2))

    def forward(self, x):
        return F.relu(self.square(x) + self.hor(x) + self.ver(x))


def asym_crop():
    model = nn.Sequential(AsymBlock(3, 8), AsymBlock(8, 8))
    return randomize(model), torch.randn(2, 3, 16, 16), 2


IDIOMS = {
    "list_stage": list_stage, "routed": routed, "mutated_list": mutated_list,
    "extend_root": extend_root, "sync_bn": sync_bn, "frozen_bn": frozen_bn,
    "bn_variants": bn_variants, "functional_bn": functional_bn,
    "generated_conv": generated_conv, "masked_edges": masked_edges,
    "diverse_bn_and_pad": diverse_bn_and_pad, "asym_crop": asym_crop,
}
