"""Evaluation of a client's heads on the test set (design §4). The accuracy math that turns
per-class accuracies into beta_sh, beta_priv and the cross-client matrix lives in ``metrics``."""

from __future__ import annotations

import numpy as np
import torch

from mhd_hpc.metrics import per_class_accuracy

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(model: torch.nn.Module, test, num_classes: int, device: torch.device) -> np.ndarray:
    """(H, C) per-class test accuracy of every head (model in eval mode while it runs)."""
    model.eval()
    preds, labels = [], []
    for batch in test.eval_batches():
        _, logits = model(batch.images.to(device))
        preds.append(torch.stack([l.argmax(1) for l in logits]).cpu().numpy())
        labels.append(batch.labels.numpy())
    model.train()
    p, y = np.concatenate(preds, axis=1), np.concatenate(labels)
    return np.stack([per_class_accuracy(p[h], y, num_classes) for h in range(p.shape[0])])
