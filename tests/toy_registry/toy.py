"""A toy task and a toy model, registered from outside hnct: what a contributor's plugin looks like.

``toy`` is T4 classification of the crops with its own training section (``config_schema``: the
keys and defaults of ``train.toy``), so the workflow plans its folds, training, evaluation, test
ensemble and report from this module alone. ``toy_mlp`` is a two-layer perceptron on a pooled crop.
"""

from __future__ import annotations

from typing import Any

from hnct.models import NUM_CLASSES, register_model
from hnct.tasks import register_task
from hnct.tasks.classify import Classify


@register_task
class Toy(Classify):
    name = "toy"
    report_title = "Toy task"
    modules = ()
    config_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "input_shape": {"type": "array", "items": {"type": "integer"}, "default": [8, 8, 8]},
            "fit": {"type": "string", "default": "resize"},
            "epochs": {"type": "integer", "minimum": 1, "default": 1},
            "batch_size": {"type": "integer", "default": 2},
            "lr": {"type": "number", "default": 1.0e-3},
            "weight_decay": {"type": "number", "default": 0.0},
            "optimizer": {"type": "string", "enum": ["adam", "adamw"], "default": "adam"},
            "patience": {"type": "integer", "default": 5},
            "focal_gamma": {"type": "number", "default": 2.0},
            "class_weights": {"type": "array", "default": [1.0, 1.0]},
            "weighted_sampler": {"type": "boolean", "default": False},
            "hu_clip": {"type": "array", "default": [-300, 300]},
            "augment": {"type": "boolean", "default": False},
            "toy_hidden": {"type": "integer", "minimum": 1, "default": 4},
        },
    }


@register_model("toy_mlp", tasks=[Toy.name], config_keys=["toy_hidden"])
def build_toy_mlp(cfg: dict[str, Any]):
    from torch import nn

    return nn.Sequential(nn.AdaptiveAvgPool3d(2), nn.Flatten(), nn.Linear(8, int(cfg["toy_hidden"])), nn.ReLU(),
                         nn.Linear(int(cfg["toy_hidden"]), NUM_CLASSES))
