"""PNG panels of segmentation results: image, ground truth, prediction, overlay (the paper's Fig. 11)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn


def _denormalize(x: torch.Tensor) -> torch.Tensor:
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    return (x.float().cpu() * std + mean).clamp(0, 1)


@torch.no_grad()
def write_panels(model: nn.Module, loader, task, out_dir: str | Path, split: str, device: torch.device,
                 dtype: torch.dtype, count: int = 4) -> list[Path]:
    """Panels for the first `count` valid images of this rank's share of `loader`. Every rank runs
    the same number of forwards (ZeRO-3 gathers parameters in them); rank 0 writes. Returns paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gps_ds import distributed as D
    from gps_ds.data.seg_transforms import longest_side_shape

    if count <= 0:
        return []
    out = Path(out_dir) / "pictures"
    written: list[Path] = []
    was_training = model.training
    model.eval()
    batches = max(1, min(len(loader), count))  # the same on every rank: exact streams have equal lengths
    for b, batch in zip(range(batches), loader):
        inputs, targets = task.to_device(batch.inputs, batch.targets, device, dtype)
        logits = task.forward(model, inputs, targets).float()
        if D.rank() != 0:
            continue
        masks, originals = targets
        for i in range(logits.shape[0]):
            if len(written) >= count or not bool(batch.valid[i]):
                continue
            h0, w0 = originals[i].shape[-2:]
            w, h = longest_side_shape(int(w0), int(h0), logits.shape[-1])
            image = _denormalize(inputs[i][:, :h, :w]).permute(1, 2, 0).numpy()
            gt = masks[i, 0, :h, :w].cpu().numpy() > 0.5
            pred = logits[i, 0, :h, :w].cpu().numpy() > 0
            overlay = image.copy()
            overlay[pred] = 0.5 * overlay[pred] + 0.5 * np.array([1.0, 0.1, 0.1], dtype=overlay.dtype)
            fig, axes = plt.subplots(1, 4, figsize=(12, 3.2))
            for ax, img, title in zip(axes, (image, gt, pred, overlay), ("image", "ground truth", "prediction",
                                                                         "overlay (prediction red)")):
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
                if title.startswith("overlay") and gt.any():
                    ax.contour(gt, levels=[0.5], colors="lime", linewidths=0.8)  # ground truth outline
                ax.set_title(title, fontsize=9)
                ax.axis("off")
            fig.suptitle(f"{split}: {batch.keys[i]}", fontsize=9)
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"{split}_{len(written):02d}.png"
            fig.savefig(path, dpi=80, bbox_inches="tight")
            plt.close(fig)
            written.append(path)
    model.train(was_training)
    return written
