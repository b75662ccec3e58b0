"""Robustness suite (the paper's Table 8): shard writers for ImageNet-A, ImageNet-R (200-class
subsets of ImageNet-1k) and ImageNet-C (15 corruptions x 5 severities), and
`gps-ds eval --suite imagenet-robustness`: top-1 on A and R with the logits restricted to the
subset's classes, mCE on C normalised by AlexNet's errors."""
