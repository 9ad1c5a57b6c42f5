"""Temperature scaling (Guo et al., 2017): one number that makes probabilities mean what they say.

A network's softmax is often over-confident. Dividing its logits by one temperature T > 0,
fitted on the validation split by negative log-likelihood, fixes most of that and leaves every
argmax, hence accuracy, unchanged. T is fitted from log-probabilities (softmax(log p / T) equals
softmax(logits / T): the per-row constant cancels), stored in the checkpoint's self-description
(``meta["temperature"]``, for its ``state_dict`` weights), and folded into the classifier when
the checkpoint is loaded for evaluation or prediction, so every path applies it the same way.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from transferkit.errors import CheckpointError
from transferkit.pipelines.rundir import CHECKPOINT_META, atomic_torch_save, safe_load

log = logging.getLogger(__name__)

METHODS = ("temperature",)
# T is searched in log space within these bounds: beyond them the fit is degenerate (all
# probability on one class, or uniform).
T_MIN, T_MAX = 0.05, 20.0


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The T that minimises the NLL of ``softmax(log probs / T)`` on ``labels``."""
    logp = torch.as_tensor(np.log(np.clip(probs, 1e-12, 1.0)), dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logp / log_t.exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return float(min(T_MAX, max(T_MIN, math.exp(log_t.item()))))


def scale(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log probs / T)``."""
    logp = torch.as_tensor(np.log(np.clip(probs, 1e-12, 1.0)), dtype=torch.float64)
    return torch.softmax(logp / temperature, dim=1).numpy().astype(np.float32)


def apply_temperature(model: nn.Module, temperature: float) -> nn.Module:
    """Fold 1/T into the classifier's weights and bias (logits / T), in place."""
    if temperature == 1.0:
        return model
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, (nn.Linear, nn.Conv2d)):
        raise CheckpointError(f"cannot apply a temperature to a {type(head).__name__} classifier: only a"
                              " linear or 1x1-convolution head can hold it")
    with torch.no_grad():
        head.weight.div_(temperature)
        if head.bias is not None:
            head.bias.div_(temperature)
    return model


def temperature_of(ckpt: dict, key: str = "state_dict") -> float:
    """The temperature stored for a checkpoint's `key` weights (1.0 when none was fitted)."""
    if key != "state_dict":
        return 1.0
    return float((ckpt.get(CHECKPOINT_META) or {}).get("temperature", 1.0))


def store_temperature(path, temperature: float) -> None:
    """Write T into the checkpoint's self-description (atomically; the weights are untouched)."""
    ckpt = safe_load(path)
    ckpt.setdefault(CHECKPOINT_META, {})["temperature"] = float(temperature)
    atomic_torch_save(ckpt, path)
    log.info("temperature %.3f stored in %s", temperature, path)


def calibration_record(probs: np.ndarray, labels: np.ndarray, temperature: float) -> dict:
    """What the temperature did on the split it was fitted on: NLL and ECE before and after."""
    from transferkit.pipelines.evaluate.metrics import expected_calibration_error, negative_log_likelihood

    after = scale(probs, temperature)
    return {"method": "temperature", "temperature": temperature, "images": int(len(labels)),
            "before": {"nll": negative_log_likelihood(probs, labels), "ece": expected_calibration_error(probs, labels)},
            "after": {"nll": negative_log_likelihood(after, labels), "ece": expected_calibration_error(after, labels)}}
