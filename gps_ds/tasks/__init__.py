"""Tasks: what a model is trained to do (classification, segmentation) behind one interface."""
