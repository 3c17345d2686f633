"""A small RepVGG-style classifier trained on scikit-learn's digits (8x8, 10 classes),
for the INT8 tests: real data, bundled with scikit-learn, nothing downloaded.

Each block sums a 3x3 conv+BN, a 1x1 conv+BN and, where shapes allow, a BN identity
branch, then ReLU (the RepVGG idiom, written here from scratch).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

MEAN, STD = 0.3, 0.4        # of the digits' pixels scaled to [0, 1]


def _conv_bn(cin: int, cout: int, k: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False),
                         nn.BatchNorm2d(cout))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.dense = _conv_bn(cin, cout, 3, stride)
        self.one = _conv_bn(cin, cout, 1, stride)
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.dense(x) + self.one(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return self.act(y)


class DigitsNet(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.blocks = nn.Sequential(Block(1, width), Block(width, width),
                                    Block(width, 2 * width, 2), Block(2 * width, 2 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x):
        return self.head(self.pool(self.blocks(x)).flatten(1))


@dataclass
class Digits:
    train_x: np.ndarray     # float32 (N, 1, 8, 8), normalized
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


@functools.lru_cache(maxsize=1)
def load() -> Digits:
    """The digits, normalized, split 80/20 (stratified, fixed seed)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = ((d.images.astype(np.float32) / 16.0 - MEAN) / STD)[:, None]
    tx, vx, ty, vy = train_test_split(x, d.target, test_size=0.2, random_state=0,
                                      stratify=d.target)
    return Digits(tx, ty, vx, vy)


@functools.lru_cache(maxsize=1)
def trained() -> DigitsNet:
    """The model trained on ``load()``, once per process (callers must not modify it)."""
    return train(load())


def train(data: Digits, *, epochs: int = 8, seed: int = 0) -> DigitsNet:
    """Adam with a cosine learning rate, batch 128, on one thread (faster than two for
    tensors this small); the model is returned in eval mode."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(data, epochs, seed)
    finally:
        torch.set_num_threads(threads)


def _train(data: Digits, epochs: int, seed: int) -> DigitsNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsNet()
        x, y = torch.from_numpy(data.train_x), torch.from_numpy(data.train_y)
        steps = epochs * -(-len(x) // 128)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(len(x))
            for i in range(0, len(x), 128):
                idx = perm[i:i + 128]
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    return model.eval()


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(logits).argmax(axis=1) == labels))


def plant_dead_channel(model: DigitsNet, data: Digits, scale: float = 400.0):
    """QARepVGG's failure on a copy of ``model``: one output channel of ``blocks[0]`` dies
    (both of its BNs give a constant -1, so ReLU gives 0 for every input) and the identity
    BN of ``blocks[1]``, which only ever sees zeros there, has its running variance
    collapsed to 0, so its scale ``gamma / sqrt(var + eps)`` is ``scale``. The float
    model's function changes only by the dead channel. Returns ``(model, branch, channel)``
    with the channel that was least active (the cheapest to kill)."""
    import copy

    planted = copy.deepcopy(model).eval()
    with torch.no_grad():
        activity = planted.blocks[0](torch.from_numpy(data.train_x)).mean(dim=(0, 2, 3))
        channel = int(activity.argmin())
        for bn in (planted.blocks[0].dense[1], planted.blocks[0].one[1]):
            bn.weight[channel] = 0.0
            bn.bias[channel] = -1.0
        identity = planted.blocks[1].identity
        identity.running_mean[channel] = 0.0
        identity.running_var[channel] = 0.0
        identity.weight[channel] = scale * identity.eps ** 0.5
    return planted, "blocks.1.identity", channel
