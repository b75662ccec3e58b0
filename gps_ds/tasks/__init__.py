"""Tasks: what a model is trained to do (classification, segmentation) behind one interface
(`gps_ds.tasks.base.Task`)."""

from __future__ import annotations

from gps_ds.tasks.base import Meter, ScoreLoss, Task, model_device_dtype, move

__all__ = ["Meter", "ScoreLoss", "Task", "build_task", "model_device_dtype", "move", "task_name"]


def task_name(cfg) -> str:
    """`task.name`, or by default segmentation for SAM models / segmentation data, else classification."""
    if cfg.task.name != "auto":
        return cfg.task.name
    if cfg.model.name.startswith("sam_") or cfg.model.family == "sam" or cfg.data.recipe == "segmentation":
        return "segmentation"
    return "classification"


def build_task(cfg) -> Task:
    name = task_name(cfg)
    if name == "segmentation":
        from gps_ds.tasks.segmentation import SegmentationTask

        task: Task = SegmentationTask(cfg)
    else:
        from gps_ds.tasks.classification import ClassificationTask

        task = ClassificationTask(cfg)
    task.check(cfg)
    return task
