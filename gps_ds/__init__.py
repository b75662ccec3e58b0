"""gps-ds: GPS (Gradient-based Parameter Selection) fine-tuning as a DeepSpeed plugin."""

__version__ = "0.1.0"
