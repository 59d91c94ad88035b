"""A tiny BN CNN trained in-test on a synthetic 4-class task (a few seconds on CPU)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def tiny_task(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Four fixed random 8x8 templates plus noise; the label is the template index."""
    templates = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    return templates[y] + 1.0 * torch.randn(n, 1, 8, 8, generator=g), y


class TinyCNN(nn.Module):
    def __init__(self, w: int = 16, bn: bool = True) -> None:
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), norm(w), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), norm(w), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(w * 16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


def train(model: nn.Module, steps: int = 40, seed: int = 0) -> nn.Module:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threading only adds overhead on a loaded machine
    try:
        return _train(model, steps, seed)
    finally:
        torch.set_num_threads(threads)


def _train(model: nn.Module, steps: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    x, y = tiny_task(2048, seed=seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())
