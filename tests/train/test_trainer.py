"""End to end on small slices of real data: the pipeline learns, prunes exactly and quantizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prunequant.config import RunConfig
from prunequant.graph.instrument import weight_quantizer
from prunequant.quant.quantizers import ActQuantizer
from prunequant.train.trainer import run


def _cfg(**train) -> RunConfig:
    return RunConfig.from_dict(
        {
            "model": {"name": "resnet20", "width": 0.25},
            "data": {"name": "digits", "batch_size": 64},
            "train": {
                "dense_epochs": 3,
                "epochs": 4,
                "lr": 0.05,
                "compress_lr": 0.02,
                "progress": False,
                "threads": 1,  # one per xdist worker (the trainer defaults to all cores)
                **train,
            },
            "recipe": {
                "prune": {"sparsity": 0.5, "unit": "steps", "start": 2, "interval": 3, "refresh": 1},
                "quant": {
                    "weight_bits": 4,
                    "act_bits": 4,
                    "unit": "steps",
                    "weight_delay": 2,
                    "act_delay": 1,
                    "first_last_bits": None,  # every layer at 4 bits
                },
            },
        }
    )


def test_run_on_real_digits_learns_and_compresses(tmp_path: Path) -> None:
    res = run(_cfg(), tmp_path)
    ph = res["phases"]
    assert ph["dense"]["accuracy"] > 70.0  # chance is 10 %
    assert ph["final"]["accuracy"] > 60.0
    assert ph["final"]["weight_bits"] == [4] and ph["final"]["act_bits"] == [4]
    assert ph["final"]["bops"] < ph["dense"]["bops"] / 50  # 32x32 -> 4x4 bits and half the channels
    # Checkpoints load safely with weights_only and hold the compression state.
    state = torch.load(tmp_path / "masked.pt", weights_only=True)
    assert "pq_step" in state and any(k.endswith(".mask") for k in state)
    assert torch.load(tmp_path / "dense.pt", weights_only=True)
    # The final model is physically smaller and computes what the masked model computes.
    sc = res["shrink_check"]
    assert sc["shrunk"] and sc["samples"] == res["data"]["test"]
    assert 0 <= sc["samples_differing"] <= 0.02 * sc["samples"] and sc["argmax_agreement"] >= 0.98
    assert res["machine"]["cpu_class"] and res["machine"]["torch"] == torch.__version__
    # "pruned" is the model the step the last mask froze; "pruned_finetuned" the one just before the
    # first quantizer turned on; the summary says which is which, and where the numbers were measured.
    tl = res["timeline"]
    assert ph["pruned"]["step"] == tl["prune_end"]
    first_q = min(tl["weight_quant_at"], tl["act_quant_at"])
    assert ph["pruned_finetuned"]["step"] == first_q - 1
    assert ph["pruned_finetuned"]["finetune_steps"] == first_q - 1 - tl["prune_end"] > 0
    from prunequant.report import summary_markdown

    text = summary_markdown({"config": {}, **res})
    assert "pruned (no recovery)" in text and "pruned + fine-tuned" in text
    assert f"measured on: {res['machine']['cpu_class']}" in text
    assert f"on {sc['samples']:,} test images: {sc['samples_differing']} differ" in text
    from prunequant.graph import load_pruned
    from prunequant.models import build_model

    x = torch.randn(4, 1, 8, 8)
    rebuilt = load_pruned(build_model("resnet20", 10, in_channels=1, image_size=8, width=0.25),
                          tmp_path / "model", x)
    assert sum(p.numel() for p in rebuilt.parameters()) == ph["final"]["params"]


def test_dense_checkpoint_is_reused(tmp_path: Path) -> None:
    first = run(_cfg(), tmp_path / "a")
    again = run(_cfg(dense_checkpoint=str(tmp_path / "a" / "dense.pt")), tmp_path / "b")
    assert again["steps"]["dense"] == 0
    assert again["phases"]["dense"]["accuracy"] == pytest.approx(first["phases"]["dense"]["accuracy"])
    # The compression phase does not depend on how the dense weights arrived: same batches, same
    # random state, hence the same compressed model, bit for bit.
    a = torch.load(tmp_path / "a" / "masked.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "masked.pt", weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert again["phases"]["final"] == first["phases"]["final"]


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_fashion_mnist_slice(tmp_path: Path) -> None:
    cfg = RunConfig.from_dict(
        {
            "model": {"name": "lenet5"},
            "data": {"name": "fashion_mnist", "train_subset": 2048, "test_subset": 1000, "batch_size": 64},
            "train": {"dense_epochs": 2, "epochs": 2, "lr": 0.05, "progress": False},
            "recipe": {
                "prune": {"sparsity": 0.5, "start": 0.1, "interval": 0.1, "refresh": 0.05},
                "quant": {"weight_bits": 8, "act_bits": 8, "weight_delay": 0.1, "act_delay": 0.05},
            },
        }
    )
    res = run(cfg, tmp_path)
    assert res["data"]["name"] == "fashion_mnist" and res["data"]["test"] == 1000
    assert res["phases"]["dense"]["accuracy"] > 65.0
    assert res["phases"]["final"]["accuracy"] > res["phases"]["dense"]["accuracy"] - 5.0
    assert [lay["channels_after"] for lay in res["layers"]] == [3, 8, 60, 42]


def test_quantizers_are_enabled_and_frozen_after_run(tmp_path: Path) -> None:
    from prunequant.models import build_model
    from prunequant.train.compressor import Compressor

    model = build_model("lenet5", 10, in_channels=1, image_size=16)
    comp = Compressor(model, _cfg().recipe, torch.randn(4, 1, 16, 16))
    opt = torch.optim.SGD(comp.model.parameters(), lr=0.01)
    x = torch.randn(16, 1, 16, 16)
    y = torch.randint(0, 10, (16,))
    for _ in range(comp.total_steps_hint + 2):
        torch.nn.functional.cross_entropy(comp.model(x), y).backward()
        opt.step()
        opt.zero_grad()
        comp.step()
    final = comp.finalize()
    aqs = [m for m in final.modules() if isinstance(m, ActQuantizer)]
    assert aqs and all(bool(a.enabled) and bool(a.frozen) for a in aqs)
    before = [a.stat_count.clone() for a in aqs]
    final.train()
    final(x)
    assert all(torch.equal(a.stat_count, b) for a, b in zip(aqs, before))
    assert all(bool(weight_quantizer(final.get_submodule(n)).enabled) for n in comp.plan.layers)


def test_qat_lr_restarts_the_schedule_when_quantization_begins() -> None:
    from prunequant.train.trainer import compress_lr_schedule

    one = compress_lr_schedule(_cfg(), 100, 40)
    assert one(0) == pytest.approx(0.02) and one(99) < 0.001  # one cosine over all steps
    assert one(40) == pytest.approx(0.5 * 0.02 * (1 + torch.cos(torch.tensor(0.4 * torch.pi)).item()))
    two = compress_lr_schedule(_cfg(qat_lr=0.005), 100, 40)
    assert two(0) == pytest.approx(0.02) and two(39) < 0.0002  # the pruning segment decays to ~0
    assert two(40) == pytest.approx(0.005)  # restart at qat_lr
    assert two(70) == pytest.approx(0.0025) and two(99) < 0.0001
    # quantization from step 0 (joint orderings) or never: one schedule
    assert compress_lr_schedule(_cfg(qat_lr=0.005), 100, 0)(0) == pytest.approx(0.02)
    assert compress_lr_schedule(_cfg(qat_lr=0.005), 100, None)(50) == pytest.approx(0.01)


def test_distillation_changes_training(tmp_path: Path) -> None:
    run(_cfg(), tmp_path / "dense")
    ckpt = str(tmp_path / "dense" / "dense.pt")
    base = run(_cfg(dense_checkpoint=ckpt), tmp_path / "ce")
    kd = run(_cfg(dense_checkpoint=ckpt, distill=0.7, distill_temperature=2.0), tmp_path / "kd")
    assert kd["phases"]["dense"]["accuracy"] == pytest.approx(base["phases"]["dense"]["accuracy"])
    assert kd["phases"]["final"]["accuracy"] > 60.0
    a = torch.load(tmp_path / "ce" / "masked.pt", weights_only=True)
    b = torch.load(tmp_path / "kd" / "masked.pt", weights_only=True)
    w = next(k for k in a if k.endswith("weight.original"))
    assert not torch.equal(a[w], b[w])  # same data order and schedule: only the loss differs


def test_a_schedule_longer_than_the_epochs_is_refused_before_training(tmp_path: Path) -> None:
    from prunequant.recipe import RecipeError

    cfg = _cfg(epochs=0.1, dense_epochs=50)  # 50 dense epochs would take minutes: the check comes first
    with pytest.raises(RecipeError, match="raise train.epochs to at least"):
        run(cfg, tmp_path / "run", log=lambda m: None)
    assert not (tmp_path / "run" / "dense.pt").exists()
