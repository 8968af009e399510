"""Random architectures: whatever discovery decides, shrink() must never change the function."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from gtools import calibrate, set_masks
from torch import Tensor, nn
from zoo import randomize

from prunequant import measure
from prunequant.graph import instrument, shrink


class RandomNet(nn.Module):
    """A random DAG of conv / norm / activation blocks, concatenations, splits, adds, pools, gates."""

    def __init__(self, seed: int):
        super().__init__()
        rng = random.Random(seed)
        self.ops: list[tuple] = []
        self.mods = nn.ModuleDict()
        chans = [3]  # channels of each tensor in the pool

        def block(i: int, c_out: int, k: str, rng: random.Random = rng) -> nn.Module:
            c_in = chans[i]
            groups = 1
            if rng.random() < 0.2 and c_in % 2 == 0 and c_out % 2 == 0 and c_in > 2:
                groups = 2
            layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, rng.choice([1, 3]), padding="same",
                                                 groups=groups, bias=rng.random() < 0.5)]
            r = rng.random()
            if r < 0.5:
                layers.append(nn.BatchNorm2d(c_out))
            elif r < 0.6 and c_out % 2 == 0:
                layers.append(nn.GroupNorm(2, c_out))
            layers.append(rng.choice([nn.ReLU(), nn.SiLU(), nn.Tanh(), nn.PReLU(c_out), nn.Sigmoid()]))
            return nn.Sequential(*layers)

        for j in range(rng.randint(4, 9)):
            kind = rng.choice(["conv", "conv", "conv", "cat", "chunk", "add", "pool", "dw", "gate"])
            i = rng.randrange(len(chans))
            name = f"m{j}"
            if kind == "conv":
                c = rng.choice([4, 6, 8, 12])
                self.mods[name] = block(i, c, name)
                self.ops.append(("mod", name, i))
                chans.append(c)
            elif kind == "dw":
                c = chans[i]
                self.mods[name] = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c),
                                                nn.ReLU6())
                self.ops.append(("mod", name, i))
                chans.append(c)
            elif kind == "cat":
                i2 = rng.randrange(len(chans))
                self.ops.append(("cat", i, i2))
                chans.append(chans[i] + chans[i2])
            elif kind == "chunk" and chans[i] % 2 == 0:
                self.ops.append(("chunk", i))
                chans.append(chans[i] // 2)
            elif kind == "add":
                same = [t for t, c in enumerate(chans) if c == chans[i] and t != i]
                if same:
                    self.ops.append(("add", i, rng.choice(same)))
                    chans.append(chans[i])
            elif kind == "pool":
                self.ops.append(("pool", i))
                chans.append(chans[i])
            elif kind == "gate" and chans[i] >= 4:
                c = chans[i]
                self.mods[name] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c // 2, 1), nn.ReLU(),
                                                nn.Conv2d(c // 2, c, 1), nn.Sigmoid())
                self.ops.append(("gate", name, i))
                chans.append(c)
        used = rng.sample(range(1, len(chans)), k=min(3, len(chans) - 1)) if len(chans) > 1 else [0]
        # A guaranteed site, drawn from its own stream so the random part above stays as it was: an
        # ungrouped conv -> (BatchNorm) -> activation -> random block, the activation read by nothing
        # else. (A grouped conv with GroupNorm can leave a site nothing removable: not guaranteed.)
        crng = random.Random(10_000 + seed)
        i = crng.randrange(len(chans))
        c = crng.choice([4, 6, 8, 12])
        chain: list[nn.Module] = [nn.Conv2d(chans[i], c, crng.choice([1, 3]), padding="same",
                                            bias=crng.random() < 0.5)]
        if crng.random() < 0.5:
            chain.append(nn.BatchNorm2d(c))
        chain.append(crng.choice([nn.ReLU(), nn.SiLU(), nn.Tanh(), nn.PReLU(c), nn.Sigmoid()]))
        self.mods["p0"] = nn.Sequential(*chain)
        self.ops.append(("mod", "p0", i))
        chans.append(self.mods["p0"][0].out_channels)
        self.mods["p1"] = block(len(chans) - 1, crng.choice([4, 6, 8]), "p1", crng)
        self.ops.append(("mod", "p1", len(chans) - 1))
        chans.append(self.mods["p1"][0].out_channels)
        self.heads = [*used, len(chans) - 1]
        self.fc = nn.Linear(sum(chans[u] for u in self.heads) * 4, 5)

    def forward(self, x: Tensor) -> Tensor:
        ts = [x]
        for op in self.ops:
            if op[0] == "mod":
                ts.append(self.mods[op[1]](ts[op[2]]))
            elif op[0] == "cat":
                ts.append(torch.cat([ts[op[1]], ts[op[2]]], dim=1))
            elif op[0] == "chunk":
                ts.append(torch.chunk(ts[op[1]], 2, dim=1)[1])
            elif op[0] == "add":
                ts.append(ts[op[1]] + ts[op[2]])
            elif op[0] == "pool":
                ts.append(F.max_pool2d(ts[op[1]], 3, 1, 1))
            elif op[0] == "gate":
                ts.append(ts[op[2]] * self.mods[op[1]](ts[op[2]]))
        feats = [F.adaptive_avg_pool2d(ts[u], 2).flatten(1) for u in self.heads]
        return self.fc(torch.cat(feats, dim=1))


@pytest.mark.parametrize("seed", range(40))
def test_random_graph_equivalence(seed: int) -> None:
    torch.manual_seed(seed)
    net = randomize(RandomNet(seed), seed).eval()
    x = torch.randn(2, 3, 8, 8)
    bits = 4 if seed % 3 == 0 else None
    gm, plan = instrument(net, prune_stat="none", example_input=x, weight_bits=bits, act_bits=bits)
    assert len(plan.sites) >= 1, plan.skipped
    assert "mods.p0.0" in {s.name for s in plan.sites}, plan.skipped.get("mods.p0.0")  # the built-in chain
    set_masks(gm, 0.5, seed=seed)
    if bits:
        calibrate(gm, (2, 3, 8, 8))
    with torch.no_grad():
        masked = gm(x)
        small = shrink(gm)
        out = small(x)
    assert float((out - masked).abs().max()) <= 1e-5 * float(masked.abs().max().clamp(min=1e-6))
    m0, m1 = measure(gm, x), measure(small, x)
    assert (m0.params, m0.macs) == (m1.params, m1.macs)
