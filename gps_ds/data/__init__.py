"""gps-ds data layer: webdataset shards (writers, readers), the paper's transforms.

Writers (one output folder per dataset, with ``_info.json``)::

    write_imagefolder, write_imagenet, write_split_lists, write_vtab, write_fgvc,
    write_kvasir, write_mnist, write_digits

Readers (``len()`` = batches per epoch, the same on every rank)::

    make_train_loader(cfg, rank, world_size, batch_size_per_rank, transform)
    make_eval_loader(...)    # EvalBatch(inputs, targets, valid, keys), every sample once
    make_score_loader(...)   # GPS scoring: ((view1, view2), labels), one epoch
"""

from .config import DataConfig, MixupConfig
from .corrupt import CorruptCounter, CorruptDataWarning
from .datasets import (write_digits, write_fgvc, write_imagefolder, write_imagenet, write_kvasir, write_mnist,
                       write_split_lists, write_vtab)
from .distributed import count_correct, reduce_accuracy, reduce_sums
from .exact_stream import EvalBatch
from .fewshot import select_few_shot
from .loaders import Loader, make_eval_loader, make_score_loader, make_train_loader, resolve_num_classes
from .shards import ShardSet, read_info, resolve
from .train_stream import NoDataError
from .transforms import (build_eval_transform, build_mixup, build_train_criterion, build_train_transform,
                         build_two_view_transform)
from .writer import WriteOptions, write_dataset

__all__ = [
    "DataConfig", "MixupConfig", "CorruptCounter", "CorruptDataWarning", "EvalBatch", "Loader", "NoDataError",
    "ShardSet", "WriteOptions",
    "write_dataset", "write_imagefolder", "write_imagenet", "write_split_lists", "write_vtab", "write_fgvc",
    "write_kvasir", "write_mnist", "write_digits",
    "make_train_loader", "make_eval_loader", "make_score_loader", "resolve_num_classes",
    "build_train_transform", "build_eval_transform", "build_two_view_transform", "build_mixup",
    "build_train_criterion", "count_correct", "reduce_accuracy", "reduce_sums", "select_few_shot",
    "read_info", "resolve",
]
