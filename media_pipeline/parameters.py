"""Merging a client's parameter update into a session's current pipeline settings."""

from typing import Any

from .pipelines import validate_parameters


def apply_update(*, pipeline: str, parameters: dict[str, Any], update: Any) -> tuple[str, dict[str, Any]]:
    """New (pipeline, parameters) after ``update``; raises ParameterError.

    An update naming the same pipeline (or none) keeps the parameters it does
    not mention; one naming another pipeline starts from that pipeline's defaults.
    """
    if not isinstance(update, dict):
        return validate_parameters(update, default_pipeline=pipeline)
    target = update.get("pipeline", pipeline)
    if target == pipeline:
        merged = {**parameters, **update, "pipeline": pipeline}
        return validate_parameters(merged, default_pipeline=pipeline)
    return validate_parameters(update, default_pipeline=pipeline)
