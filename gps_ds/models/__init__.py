from gps_ds.models.factory import ModelError, create_model, create_model_from_config

__all__ = ["ModelError", "create_model", "create_model_from_config"]
