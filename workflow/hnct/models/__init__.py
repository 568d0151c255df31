"""The model registry: ``register_model`` (one call per network, in its family's module) and
``build_model(task, name, cfg)``.

A model is registered once with its name, the tasks it serves, a builder ``cfg -> nn.Module`` (``cfg``
is the job's train config: the task's ``train.<task>`` section plus the shared train keys) and the
config keys it alone reads (``config_keys``, e.g. ``cnn3d_channels``): the workflow gives those keys
to that model's jobs only, so changing one model's hyperparameter reruns that model alone. Their one
default is the schema's (config/schema.yaml, or a plugin task's ``config_schema``).

Built-in families: :mod:`hnct.models.cnn3d` (classify), :mod:`hnct.models.monai_nets` (MONAI's 3D
ResNets and DenseNet121 for classify, the 2D BasicUNet for segment), :mod:`hnct.models.snet`
(segment), :mod:`hnct.models.oar_nets` (oar: DynUNet, SegResNet). A plugin module (config
``plugins``) registers more with the same decorator.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

NUM_CLASSES = 2  # non-T4, T4: the classify models' logits


@dataclass(frozen=True)
class ModelSpec:
    """One registered network: ``builder(cfg)`` returns it for any of ``tasks``."""

    name: str
    tasks: tuple[str, ...]
    builder: Callable[[dict[str, Any]], Any]
    config_keys: tuple[str, ...] = ()
    module: str = ""


MODELS: dict[str, ModelSpec] = {}


def register_model(name: str, tasks: Iterable[str], config_keys: Iterable[str] = ()):
    """Decorator: register ``builder(cfg) -> nn.Module`` as model ``name`` of ``tasks``."""

    def decorator(builder: Callable[[dict[str, Any]], Any]):
        if name in MODELS and MODELS[name].builder is not builder:
            raise ValueError(f"model {name!r} is registered twice ({MODELS[name].module} and {builder.__module__})")
        MODELS[name] = ModelSpec(name, tuple(tasks), builder, tuple(config_keys), builder.__module__)
        return builder

    return decorator


def get_model(name: str, task: str | None = None) -> ModelSpec:
    """The registered model ``name`` (serving ``task`` when given); ValueError naming the choices."""
    from hnct.tasks import get_task

    if task is not None:
        get_task(task)  # an unknown task is refused first, naming the registered ones
    spec = MODELS.get(name)
    if spec is None or (task is not None and task not in spec.tasks):
        choices = ", ".join(model_names(task))
        raise ValueError(f"unknown {task + ' ' if task else ''}model {name!r}; registered: {choices}")
    return spec


def model_names(task: str | None = None) -> list[str]:
    """Registered model names (of ``task`` when given), sorted."""
    return sorted(n for n, spec in MODELS.items() if task is None or task in spec.tasks)


def build_model(task: str, name: str, cfg: dict[str, Any] | None = None):
    """The network ``name`` of ``task``, sized by the job's train config ``cfg``."""
    spec, cfg = get_model(name, task), dict(cfg or {})
    missing = [key for key in spec.config_keys if key not in cfg]
    if missing:
        raise ValueError(f"model {name!r} needs train.{task}.{', '.join(missing)} in its config "
                         "(the schema's default reaches the job through the workflow)")
    return spec.builder(cfg)


def other_models_keys(task: str, name: str) -> set[str]:
    """Config keys of ``train.<task>`` that belong to the task's other models (not to ``name``)."""
    own = set(MODELS[name].config_keys)
    return {key for other in model_names(task) if other != name
            for key in MODELS[other].config_keys} - own


def load_plugins(modules: Iterable[str]) -> None:
    """Import the plugin modules (config ``plugins``) so that their tasks and models register."""
    for module in modules:
        importlib.import_module(module)


from hnct.models import cnn3d, monai_nets, oar_nets, snet  # noqa: E402,F401  (register the built-in models)
