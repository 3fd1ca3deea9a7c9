"""A notebook session with landscape-probe, as a plain script: a small model of one's own, trained
for a few seconds on the digits (8x8, bundled with scikit-learn's copy in the package), then every
probe on it through the flat API, each result shown three ways: its ``repr`` (the key numbers and
the samples used), ``.to_frame()`` (a pandas DataFrame) and ``.figure()`` (a plotly figure).

    python examples/notebook.py [FOLDER]

writes each probe's figures as a page into FOLDER (default: a new temporary folder), the pages
sharing one ``plotly.min.js``; in a notebook, ``h.figure().show()`` draws it inline instead. The core is five
lines::

    import probe
    h = probe.hessian_spectrum(model, x, y)
    h                          # HessianResult(hessian: samples=200 of 1797, lambda_max=..., ...)
    h.to_frame()               # the eigenvalues by rank
    h.figure().show()
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import probe
from probe.probes.gradvar import GradVarParams


class Block(nn.Module):
    """A residual block whose branch ``r`` joins the input by addition (``x + r``) or by a
    sigmoid gate (``x * 2 sigmoid(r)``: 1 at r = 0, so the block starts as the identity)."""

    def __init__(self, channels: int, fusion: str):
        super().__init__()
        self.fusion = fusion
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        r = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(x + r) if self.fusion == "add" else x * 2 * torch.sigmoid(r)


class SmallNet(nn.Module):
    """A stem, one additive and one multiplicative block, global pooling and a linear head."""

    def __init__(self, channels: int = 8, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                                  nn.ReLU())
        self.blocks = nn.Sequential(Block(channels, "add"), Block(channels, "mul"))
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def train(model: nn.Module, x, y, epochs: int = 4, batch: int = 50, seed: int = 0) -> float:
    """A few epochs of Adam; returns the final training accuracy (eval mode)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def tour(out: Path) -> dict:
    """Train the small model, run every probe on it, print each result (repr and the first rows of
    its table) and write its figures as pages into ``out``; returns ``{name: result}``."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    data = probe.load_data("digits", limit_train=400, limit_test=100)
    x, y = data.x_train, data.y_train
    model = SmallNet()
    print(f"SmallNet, {sum(p.numel() for p in model.parameters())} parameters: training accuracy "
          f"{train(model, x, y):.1%} after a few seconds of training")

    results = {
        # curvature of the loss: top eigenvalues, trace, spectral density (on 64 of the samples)
        "hessian": probe.hessian_spectrum(model, x, y, k=4, trace_matvecs=10, density_probes=1,
                                          density_steps=12, n_samples=64),
        # the empirical NTK on 32 samples (its spectrum below)
        "ntk": probe.empirical_ntk(model, x[:32]),
        # the loss over a plane of two random, filter-normalised directions
        "surface": probe.loss_surface(model, x[:64], y[:64], probe.random_directions(model, 2, seed=0),
                                      grid="-1:1:7"),
        # gradient noise per layer (mini-batches of 32)
        "gradvar": probe.gradient_variance(model, x[:128], y[:128], GradVarParams(
            batch_size=32, batches=4, per_sample=False, signal=False)),
        # how far the sigmoid gate of the multiplicative block sits in its flat tails
        "saturation": probe.saturation(model, x[:128]),
        # the outputs along mixup paths between pairs of samples
        "interp": probe.interpolation_paths(model, x[:64], y[:64], pairs=6, steps=15, triples=1,
                                            plane_resolution=9),
    }
    results["ntk spectrum"] = probe.ntk_spectrum(results["ntk"])
    for name, result in results.items():
        print(f"\n== {name}\n{result!r}")
        print(result.to_frame().head(5).to_string())
        # every figure of the probe on one page; the pages share one plotly.min.js
        probe.write_html(result.figures("SmallNet"), out / f"{name.replace(' ', '_')}.html",
                         plotlyjs=out / "plotly.min.js", title=f"{name} of SmallNet")
    print(f"\nfigures: {out}")
    return results


def main(argv: list[str]) -> int:
    tour(Path(argv[0]) if argv else Path(tempfile.mkdtemp(prefix="probe-notebook-")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
