"""The contract of a scorer: what the evaluation ranks, for every model kind and the closed-form baselines."""

from __future__ import annotations

from collections.abc import Callable

import torch

# (indices (N,), offsets (B+1,)) -> (scores (B, M), representations (B, K, D) or None)
Scorer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
