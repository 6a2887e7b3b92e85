"""The model registry: a logged model registered under a name, with an alias pointing at it."""

from __future__ import annotations

from mlflow.exceptions import MlflowException

from mlexp.errors import MlexpError


def register_version(client, name: str, model, alias: str, owner_tags: dict[str, str], description: str) -> str:
    """Register logged `model` as a new version of `name` and point `alias` at it; the version.

    A registered model that does not carry `owner_tags` belongs to someone else: refused, so
    an alias of another tool's model never moves."""
    try:
        registered = client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, tags=owner_tags, description=description)
    else:
        if any(registered.tags.get(key) != value for key, value in owner_tags.items()):
            tag = ", ".join(owner_tags)
            raise MlexpError(f"registered model {name!r} was not registered by mlexp (no {tag} tag); "
                             "choose another --name")
    version = client.create_model_version(name, source=f"models:/{model.model_id}", run_id=model.source_run_id,
                                          model_id=model.model_id, tags=owner_tags)
    client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)
