"""The ``data`` section of a gps-ds config (pydantic v2).

The batch size is not here: it comes from the DeepSpeed config
(``train_micro_batch_size_per_gpu``) and is passed to the loaders as an argument.
"""

from __future__ import annotations

from typing import Literal, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

Recipe = Literal["fgvc", "vtab", "imagenet", "digits", "segmentation"]
ShardSpec = Union[str, list[str]]

#: Default input side per recipe when ``image_size`` is not set.
DEFAULT_IMAGE_SIZE = {"fgvc": 224, "vtab": 224, "imagenet": 224, "digits": 224, "segmentation": 1024}


class MixupConfig(BaseModel):
    """Mixup / CutMix / label smoothing, with the arguments of ``timm.data.Mixup``.

    All zero (the default) means: plain integer labels, no mixing.
    The paper's FGVC recipe is ``mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1``.
    """

    model_config = ConfigDict(extra="forbid")

    mixup_alpha: float = Field(0.0, ge=0.0)
    cutmix_alpha: float = Field(0.0, ge=0.0)
    cutmix_minmax: Optional[Tuple[float, float]] = None
    prob: float = Field(1.0, ge=0.0, le=1.0)
    switch_prob: float = Field(0.5, ge=0.0, le=1.0)
    mode: Literal["batch", "pair", "elem"] = "batch"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)

    @property
    def mixing(self) -> bool:
        """True when images are mixed (mixup or cutmix active)."""
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0 or self.cutmix_minmax is not None)


class DataConfig(BaseModel):
    """Where the shards are and how samples become tensors.

    ``train`` / ``val`` / ``test`` each name a folder written by ``gps-ds shards``
    (holding ``_info.json``; the split named by ``*_split`` is read from it), or
    webdataset URLs: a local path, a brace pattern (``data/train-{000000..000009}.tar``),
    ``pipe:CMD`` or ``http(s)://``; or a list of those.
    """

    model_config = ConfigDict(extra="forbid")

    train: Optional[ShardSpec] = None
    val: Optional[ShardSpec] = None
    test: Optional[ShardSpec] = None
    train_split: Union[str, list[str]] = "train"
    val_split: Union[str, list[str]] = "val"
    test_split: Union[str, list[str]] = "test"

    recipe: Recipe = "fgvc"
    num_classes: Optional[int] = Field(None, ge=1, description="else from _info.json")
    image_size: Optional[int] = Field(None, ge=8, description="else 224 (1024 for segmentation)")
    # None: the model's own (timm pretrained_cfg via resolve_data_config; SAM: segment-anything's
    # pixel mean/std), else timm's defaults: ImageNet mean/std, crop 0.875, bicubic.
    interpolation: Optional[Literal["bilinear", "bicubic", "nearest"]] = Field(None, description="else the model's")
    crop_pct: Optional[float] = Field(None, gt=0.0, le=1.0, description="eval resize = image_size / crop_pct "
                                      "(fgvc, imagenet); else the model's")
    mean: Optional[Tuple[float, float, float]] = None
    std: Optional[Tuple[float, float, float]] = None
    fast_crop: bool = Field(True, description="train crop (fgvc, imagenet): reduced-scale JPEG decoding of large "
                                              "crops + torch uint8 antialiased resize (same crops, PIL-equal pixels)")
    hflip: float = Field(0.5, ge=0.0, le=1.0)
    vflip: float = Field(0.0, ge=0.0, le=1.0, description="segmentation only")

    workers: int = Field(4, ge=0, description="DataLoader workers per rank")
    prefetch: int = Field(4, ge=1, description="batches each worker prepares ahead (DataLoader prefetch_factor; "
                                               "ignored with workers=0)")
    pin_memory: Union[bool, Literal["auto"]] = Field("auto", description="pin decoded batches for non-blocking "
                                                   "copies; auto: on CUDA only (a no-op on CPU)")
    steps_per_epoch: Optional[int] = Field(None, ge=1, description="else ceil(train_size / global batch)")
    train_size: Optional[int] = Field(None, ge=1, description="else from _info.json")
    shuffle_buffer: int = Field(1000, ge=0)
    seed: int = 0
    few_shot: Optional[int] = Field(None, ge=1, description="k training samples per class (chosen by seed)")
    mixup: MixupConfig = Field(default_factory=MixupConfig)

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.recipe == "segmentation" and self.mixup.mixing:
            raise ValueError("data.mixup: mixup/cutmix do not apply to the segmentation recipe")
        if self.recipe == "segmentation" and self.few_shot is not None:
            raise ValueError("data.few_shot: needs class labels; not available for the segmentation recipe")
        if (self.mean is None) != (self.std is None):
            raise ValueError("data.mean and data.std: give both or neither")
        return self

    @property
    def size(self) -> int:
        """The input side in pixels (``image_size`` or the recipe's default)."""
        return self.image_size or DEFAULT_IMAGE_SIZE[self.recipe]
