"""The recipes, and :func:`train`, which runs the one ``cfg.training.recipe`` names."""

from __future__ import annotations

from typing import Any

from .finetune import train_finetune
from .loop import train as train_language_model
from .transfer import train_transfer

RECIPES = {"lm": train_language_model, "transfer": train_transfer, "finetune": train_finetune}


def train(cfg: Any, **kwargs: Any) -> dict[str, Any]:
    """Train (or resume) the run ``cfg`` describes with its recipe (``training.recipe``); returns its summary."""
    return RECIPES.get(cfg.training.recipe, train_language_model)(cfg, **kwargs)


__all__ = ["RECIPES", "train"]
