"""t-SNE of penultimate features (the input of the classifier head) of the base model and of the
fine-tuned model on the same samples (the paper's Fig. 13), with two numbers per panel that do not
depend on the projection: the silhouette score of the features by class and a leave-one-out 5-NN
accuracy."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn

from gps_ds.analysis.common import pyplot


@torch.no_grad()
def penultimate(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's pre-logits features: `forward_head(forward_features(x), pre_logits=True)`."""
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise ValueError(f"{type(model).__name__} has no forward_features/forward_head: t-SNE needs a timm classifier")
    return model.forward_head(model.forward_features(x), pre_logits=True).flatten(1)


def collect_features(models: dict[str, nn.Module], loader, max_samples: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    feats: dict[str, list[torch.Tensor]] = {k: [] for k in models}
    labels: list[torch.Tensor] = []
    seen = 0
    for batch in loader:
        x, y, valid = batch[0], batch[1], batch[2].bool()
        x, y = x[valid], y[valid]
        take = min(len(y), max_samples - seen)
        if take <= 0:
            break
        for k, m in models.items():
            feats[k].append(penultimate(m, x[:take].float()))
        labels.append(y[:take])
        seen += take
    if seen == 0:
        raise ValueError("t-SNE: the split holds no samples")
    return {k: torch.cat(v).numpy() for k, v in feats.items()}, torch.cat(labels).numpy()


def feature_scores(features: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import silhouette_score
    from sklearn.neighbors import NearestNeighbors

    classes = np.unique(labels)
    sil = float(silhouette_score(features, labels)) if 1 < len(classes) < len(labels) else float("nan")
    n = min(6, len(labels))
    _, nn_idx = NearestNeighbors(n_neighbors=n).fit(features).kneighbors(features)
    votes = labels[nn_idx[:, 1:]]  # leave the sample itself out
    pred = np.array([np.bincount(v).argmax() if len(v) else -1 for v in votes])
    return {"silhouette": round(sil, 6), "knn_accuracy": round(float((pred == labels).mean()), 6)}


def embed(features: np.ndarray, seed: int, perplexity: float) -> np.ndarray:
    from sklearn.manifold import TSNE

    perplexity = min(perplexity, max(1.0, (len(features) - 1) / 3))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)


def analyze_tsne(cfg, delta_path: str, split: str = "test", max_samples: int = 1000, seed: int = 0,
                 perplexity: float = 30.0) -> tuple[dict[str, Any], Any]:
    from gps_ds.data.loaders import make_eval_loader
    from gps_ds.multitask import model_with_delta

    if max_samples < 4:
        raise ValueError("--max-samples: t-SNE needs at least 4 samples")
    base, tuned, delta = model_with_delta(cfg, delta_path)
    batch = int(cfg.deepspeed.get("train_micro_batch_size_per_gpu", 32))
    loader = make_eval_loader(cfg.data, 0, 1, batch_size_per_rank=batch, split=split)
    feats, labels = collect_features({"before": base, "after": tuned}, loader, max_samples)
    result: dict[str, Any] = {"delta": str(delta_path), "method": delta.meta.get("method"), "split": split,
                              "samples": int(len(labels)), "feature_dim": int(feats["before"].shape[1]),
                              "seed": seed, "labels": labels.tolist()}
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.6))
    for ax, key in zip(axes, ("before", "after")):
        xy = embed(feats[key], seed, perplexity)
        result[key] = {**feature_scores(feats[key], labels), "embedding": np.round(xy, 4).tolist()}
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab10" if labels.max() < 10 else "tab20", s=8)
        ax.set_title(f"{key} fine-tuning ({delta.meta.get('method', '?')})\nsilhouette "
                     f"{result[key]['silhouette']:.2f}, 5-NN {100 * result[key]['knn_accuracy']:.1f}%", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(sc, ax=list(axes), label="class")
    return result, fig
