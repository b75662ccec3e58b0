from gps_ds.models.factory import ModelError, create_model, create_model_from_config
from gps_ds.models.sam import SAM_MODEL_NAMES, SamSegmenter, boxes_from_masks

__all__ = ["ModelError", "SAM_MODEL_NAMES", "SamSegmenter", "boxes_from_masks", "create_model",
           "create_model_from_config"]
