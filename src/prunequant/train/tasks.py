"""What the one trainer (:mod:`prunequant.train.trainer`) asks of a task: data, model, loss, metrics.

Two tasks, picked by ``data.name`` (:func:`task_for`):

* ``classification`` (every classification dataset): cross-entropy, test / validation top-1 accuracy
  (``accuracy``, %, higher is better); the masked vs smaller model check compares logits and argmax.
* ``restoration`` (``sr_images``: super-resolution with ``espcn`` / ``fsrcnn``; ``denoise_images``:
  denoising with ``unet_denoise``; data in :mod:`prunequant.data.images`): **MSE** loss (PSNR is a
  function of the MSE, so the loss is the reported metric's own; it is also ESPCN's and FSRCNN's
  training loss), test PSNR and SSIM (``psnr``, dB, higher is better) with the conventions of
  :mod:`prunequant.metrics.image` (SR: on Y, ``scale`` pixels cut off each side), the bicubic
  (SR) or noisy-input (denoising) reference, and the masked vs smaller check comparing the two
  output images (max abs difference, PSNR between them). The network input (the image) and the
  output are not quantized by the task: the recipe decides (``quant.first_last_bits``,
  ``quant.per_layer``; see ``recipes/espcn_x3_w8a8.yaml``).

A task does not train: the trainer's loop, checkpoints, resume, ``torchrun`` and report are the
same for both; it only calls :meth:`Task.loss` where it computed the cross-entropy before.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..config import RESTORATION_DATA, RunConfig, check_task_fields
from ..recipe import RecipeError
from ..utils import eval_mode

__all__ = ["CLASSIFICATION", "RESTORATION", "ClassificationTask", "RestorationTask", "Task", "task_for"]


class Task(ABC):
    """The task-specific pieces of a run (see the module docs); each task implements the abstract
    methods."""

    name = ""
    metric = ""  # the primary metric: a key of every phase result
    higher_is_better = True

    def as_dict(self, data: Any) -> dict[str, Any]:
        """report.json's ``task`` entry."""
        return {"name": self.name, "metric": self.metric, "higher_is_better": self.higher_is_better,
                "label": self.metric_label(data)}

    @abstractmethod
    def metric_label(self, data: Any) -> str:
        ...

    @abstractmethod
    def load_data(self, cfg: RunConfig, log: Callable[[str], None]) -> Any:
        ...

    @abstractmethod
    def build_model(self, cfg: RunConfig, data: Any) -> nn.Module:
        ...

    @abstractmethod
    def example(self, data: Any) -> Tensor:
        """A batch of model inputs (tracing, :func:`prunequant.measure` on its first sample)."""
        ...

    @abstractmethod
    def loss(self, out: Tensor, target: Tensor) -> Tensor:
        ...

    @abstractmethod
    def distill_loss(self, out: Tensor, teacher_out: Tensor, temperature: float) -> Tensor:
        ...

    @abstractmethod
    def phase_metrics(self, model: nn.Module, data: Any, device: torch.device, cfg: RunConfig
                      ) -> tuple[dict[str, Any], float | None]:
        """The phase's metrics (report keys first in a phase result) and the value ``density`` divides
        by the memory (``None``: no density)."""
        ...

    @abstractmethod
    def shrink_check(self, masked: nn.Module, final: nn.Module, dataset: Any, device: torch.device,
                     batch_size: int) -> dict[str, Any]:
        ...

    @abstractmethod
    def data_info(self, data: Any) -> dict[str, Any]:
        ...

    def reference(self, data: Any) -> dict[str, Any] | None:
        """A model-free reference on the same test / validation sets (``None``: there is none)."""
        return None

    def figures(self, out: Path, cfg: RunConfig, data: Any, dense: nn.Module, final: nn.Module,
                device: torch.device) -> list[str]:
        """Task pictures written into the run folder (names); none by default."""
        return []


class ClassificationTask(Task):
    """Cross-entropy and top-1 accuracy: the trainer's behaviour before tasks, bit for bit."""

    name = "classification"
    metric = "accuracy"

    def metric_label(self, data: Any) -> str:
        return "test accuracy (%)"

    def load_data(self, cfg: RunConfig, log: Callable[[str], None]) -> Any:
        from .trainer import load_data

        return load_data(cfg, log)

    def build_model(self, cfg: RunConfig, data: Any) -> nn.Module:
        from ..models import build_model

        try:
            return build_model(cfg.model.name, num_classes=data.num_classes, in_channels=data.in_channels,
                               image_size=data.image_size, width=cfg.model.width)
        except ValueError as e:
            raise RecipeError(f"model: {cfg.model.name} cannot be built for {data.name} "
                              f"({data.in_channels}x{data.image_size}x{data.image_size} images): "
                              f"{e}") from None

    def example(self, data: Any) -> Tensor:
        return next(iter(DataLoader(data.val if len(data.val) else data.train, batch_size=8)))[0]

    def loss(self, out: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(out, target)

    def distill_loss(self, out: Tensor, teacher_out: Tensor, temperature: float) -> Tensor:
        soft = F.log_softmax(teacher_out / temperature, dim=1)
        return F.kl_div(F.log_softmax(out / temperature, dim=1), soft, log_target=True,
                        reduction="batchmean") * temperature ** 2

    def phase_metrics(self, model: nn.Module, data: Any, device: torch.device, cfg: RunConfig
                      ) -> tuple[dict[str, Any], float | None]:
        from .trainer import evaluate

        acc = evaluate(model, data.test, device, cfg.data.eval_batch_size)
        val = evaluate(model, data.val, device, cfg.data.eval_batch_size) if len(data.val) else None
        return {"accuracy": acc, "val_accuracy": val}, acc

    def shrink_check(self, masked: nn.Module, final: nn.Module, dataset: Any, device: torch.device,
                     batch_size: int) -> dict[str, Any]:
        from .trainer import _shrink_check

        return _shrink_check(masked, final, dataset, device, batch_size)

    def data_info(self, data: Any) -> dict[str, Any]:
        return {"name": data.name, "source": data.source, "train": len(data.train), "val": len(data.val),
                "test": len(data.test), "num_classes": data.num_classes,
                "input_shape": [data.in_channels, data.image_size, data.image_size]}


class RestorationTask(Task):
    """Super-resolution / denoising: MSE loss, PSNR and SSIM (module docs)."""

    name = "restoration"
    metric = "psnr"

    def metric_label(self, data: Any) -> str:
        on = "Y" if data.in_channels == 1 else "RGB"
        return f"test PSNR (dB, {on})"

    def load_data(self, cfg: RunConfig, log: Callable[[str], None]) -> Any:
        from ..data.images import DEFAULT_SIGMA, load_denoising, load_super_resolution

        d = cfg.data
        ppe = d.patches_per_epoch or 1024
        if d.name == "sr_images":
            bundle = load_super_resolution(scale=d.scale or 3, patch_size=d.patch_size or 32,
                                           patches_per_epoch=ppe, seed=cfg.train.seed, augment=d.augment)
        else:
            p = d.patch_size or 64
            if p % 4:
                raise RecipeError(f"data.patch_size={p}: the U-Net halves the image twice, so the patch "
                                  "side must be a multiple of 4 (e.g. 48, 64)")
            sigma = d.sigma / 255.0 if d.sigma is not None else DEFAULT_SIGMA
            bundle = load_denoising(sigma=sigma, channels=d.channels or "rgb", patch_size=p,
                                    patches_per_epoch=ppe, seed=cfg.train.seed, augment=d.augment)
        bundle.name = d.name
        return bundle

    def build_model(self, cfg: RunConfig, data: Any) -> nn.Module:
        from ..models import build_restoration_model

        try:
            return build_restoration_model(cfg.model.name, in_channels=data.in_channels, scale=data.scale,
                                           width=cfg.model.width)
        except ValueError as e:
            raise RecipeError(f"model: {cfg.model.name} cannot be built for {data.name}: {e}") from None

    def example(self, data: Any) -> Tensor:
        # training patches are drawn from their own seeded generators: no global random state is used
        return torch.stack([data.train[i][0] for i in range(min(8, len(data.train)))])

    def loss(self, out: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(out, target)

    def distill_loss(self, out: Tensor, teacher_out: Tensor, temperature: float) -> Tensor:
        return F.mse_loss(out, teacher_out)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Any, device: torch.device, border: int
                 ) -> dict[str, Any]:
        """Mean PSNR / SSIM of the model over a whole-image set (``per_image``: name -> [psnr, ssim])."""
        from ..data.images import evaluate_restoration

        with eval_mode(model):
            r = evaluate_restoration(lambda x: model(x.to(device)).float().cpu(), dataset, border=border)
        r["per_image"] = {k: [float(a), float(b)] for k, (a, b) in r["per_image"].items()}
        return r

    def phase_metrics(self, model: nn.Module, data: Any, device: torch.device, cfg: RunConfig
                      ) -> tuple[dict[str, Any], float | None]:
        test = self.evaluate(model, data.test, device, data.border)
        val = self.evaluate(model, data.val, device, data.border) if len(data.val) else None
        return {"psnr": test["psnr"], "ssim": test["ssim"],
                "val_psnr": val["psnr"] if val else None, "val_ssim": val["ssim"] if val else None,
                "per_image": test["per_image"]}, None

    @torch.no_grad()
    def shrink_check(self, masked: nn.Module, final: nn.Module, dataset: Any, device: torch.device,
                     batch_size: int) -> dict[str, Any]:
        """The masked vs the physically smaller model on every test image: the largest absolute
        difference between their outputs, the lowest PSNR of one output against the other, and the
        images whose outputs differ by more than 1e-5 of the output range (float noise)."""
        from ..metrics.image import psnr

        masked.eval()
        final.eval()
        n = differing = 0
        worst, lowest = 0.0, float("inf")
        for i in range(len(dataset)):
            x = dataset[i][0][None].to(device)
            a, b = masked(x).float().cpu(), final(x).float().cpu()
            d = float((a - b).abs().max())
            differing += int(d > 1e-5 * float(a.abs().max().clamp(min=1e-12)))
            worst = max(worst, d)
            lowest = min(lowest, float(psnr(b[0], a[0])))
            n += 1
        return {"shrunk": final is not masked, "samples": n, "samples_differing": differing,
                "max_abs_diff": worst, "min_psnr_between": lowest if n and lowest != float("inf") else None}

    def data_info(self, data: Any) -> dict[str, Any]:
        p = data.train.patch_size
        return {"name": data.name, "source": "photographs bundled with scikit-image / scikit-learn",
                "task": data.task, "train": len(data.train), "val": len(data.val), "test": len(data.test),
                "scale": data.scale, "sigma": data.sigma, "border": data.border, "patch_size": p,
                "input_shape": [data.in_channels, p, p], "train_images": list(data.train_images),
                "val_images": list(data.val_images), "test_images": list(data.test_images),
                "degradation": data.degradation}

    def reference(self, data: Any) -> dict[str, Any]:
        from ..data.images import bicubic_upscale, evaluate_restoration

        if data.task == "sr":
            name, fn = f"bicubic x{data.scale}", (lambda x: bicubic_upscale(x, data.scale))
        else:
            name, fn = "noisy input", (lambda x: x)
        test = evaluate_restoration(fn, data.test, border=data.border)
        val = evaluate_restoration(fn, data.val, border=data.border) if len(data.val) else None
        return {"name": name, "psnr": test["psnr"], "ssim": test["ssim"],
                "val_psnr": val["psnr"] if val else None,
                "per_image": {k: [float(a), float(b)] for k, (a, b) in test["per_image"].items()}}

    @torch.no_grad()
    def figures(self, out: Path, cfg: RunConfig, data: Any, dense: nn.Module, final: nn.Module,
                device: torch.device) -> list[str]:
        """``restoration.png``: a crop of the first test image, side by side: bicubic (SR) or noisy input
        (denoising), the dense model, the compressed model, the ground truth; PSNR of each crop."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from ..data.images import bicubic_upscale
        from ..metrics.image import psnr
        from ..utils import atomic_write

        x, target = data.test[0]
        name = data.test.names[0] if hasattr(data.test, "names") else "test image 0"
        s = data.scale
        h, w = x.shape[-2:]
        c = min(h, w, 96 // s)  # crop side in input pixels (96 output pixels)
        # of 5 x 5 candidate positions, the crop with the most detail (standard deviation of the target)
        cands = [((h - c) * i // 4, (w - c) * j // 4) for i in range(5) for j in range(5)]
        y0, x0 = max(cands, key=lambda p: float(target[:, p[0] * s:(p[0] + c) * s,
                                                      p[1] * s:(p[1] + c) * s].std()))
        m = 8 if data.task == "sr" else 0  # a margin of context so the crop has no border effects
        ya, xa = max(0, y0 - m), max(0, x0 - m)
        xin = x[:, ya:min(h, y0 + c + m), xa:min(w, x0 + c + m)]
        oy, ox = (y0 - ya) * s, (x0 - xa) * s

        def crop(img: Tensor) -> Tensor:
            return img[..., oy:oy + c * s, ox:ox + c * s].clamp(0, 1)

        with eval_mode(dense), eval_mode(final):
            outs = {
                ("bicubic" if data.task == "sr" else "noisy input"):
                    crop(bicubic_upscale(xin[None], s)[0] if data.task == "sr" else xin),
                "dense": crop(dense(xin[None].to(device))[0].float().cpu()),
                "compressed": crop(final(xin[None].to(device))[0].float().cpu()),
            }
        gt = target[:, y0 * s:(y0 + c) * s, x0 * s:(x0 + c) * s]
        fig, axes = plt.subplots(1, 4, figsize=(12, 3.4))
        for ax, (label, img) in zip(axes, [*outs.items(), ("ground truth", gt)]):
            arr = img.permute(1, 2, 0).numpy()
            ax.imshow(arr[..., 0] if arr.shape[-1] == 1 else arr, cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
            sub = "" if label == "ground truth" else f"\n{float(psnr(img, gt)):.2f} dB on this crop"
            ax.set_title(f"{label}{sub}", fontsize=9)
            ax.axis("off")
        on = "Y" if data.in_channels == 1 else "RGB"
        fig.suptitle(f"{name}: {cfg.model.name} ({data.degradation}; {on})", fontsize=9)
        fig.tight_layout(rect=(0, 0, 1, 0.93))
        atomic_write(out / "restoration.png", lambda p: fig.savefig(p, dpi=110, format="png"))
        plt.close(fig)
        return ["restoration.png"]


CLASSIFICATION = ClassificationTask()
RESTORATION = RestorationTask()


def task_for(cfg: RunConfig) -> Task:
    """The task of a configuration (by ``data.name``); a model that does not fit the data is one
    :class:`RecipeError` naming ``model.name`` and ``data.name``."""
    check_task_fields(cfg)
    return RESTORATION if cfg.data.name in RESTORATION_DATA else CLASSIFICATION
