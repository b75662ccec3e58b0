"""Corruption error (Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common
Corruptions and Perturbations", ICLR 2019).

CE_c = (sum over severities of the model's top-1 error on corruption c) / (the same sum for
AlexNet); mCE = mean of CE_c over the 15 corruptions, in percent. The AlexNet numbers are its
top-1 errors averaged over the 5 severities, as published in the authors' repository
(github.com/hendrycks/robustness, ImageNet-C evaluation script) and copied from there by e.g.
AugMix (github.com/google-research/augmix, imagenet.py, "Raw AlexNet errors taken from
https://github.com/hendrycks/robustness"); checked offline against two such copies.
"""

from __future__ import annotations

from typing import Mapping

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
#: AlexNet top-1 error per corruption, mean over severities 1-5 (source: module docstring)
ALEXNET_ERR: dict[str, float] = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640, "defocus_blur": 0.819880,
    "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360, "snow": 0.866816, "frost": 0.826572,
    "fog": 0.819324, "brightness": 0.564592, "contrast": 0.853204, "elastic_transform": 0.646056,
    "pixelate": 0.717840, "jpeg_compression": 0.606500,
}


def corruption_errors(errors: Mapping[str, Mapping[int, float]]) -> dict[str, float]:
    """CE per corruption (percent) from top-1 errors in [0, 1] per corruption and severity."""
    out = {}
    for c, by_sev in errors.items():
        if c not in ALEXNET_ERR:
            raise ValueError(f"unknown corruption {c!r} (expected one of {', '.join(CORRUPTIONS)})")
        if not by_sev:
            raise ValueError(f"corruption {c!r}: no severity evaluated")
        out[c] = 100.0 * (sum(by_sev.values()) / len(by_sev)) / ALEXNET_ERR[c]
    return out


def mce(errors: Mapping[str, Mapping[int, float]]) -> float:
    ce = corruption_errors(errors)
    return sum(ce.values()) / len(ce)
