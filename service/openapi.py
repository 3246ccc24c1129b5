"""Models in the OpenAPI schema that no route parameter declares.

A route that reads its own body (the OIP infer route parses it off the event loop) declares
it with ``openapi_extra`` as a ``$ref`` to ``#/components/schemas/<Model>``;
:func:`install_schemas` puts those models (and the models they use) into the components.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

REF_TEMPLATE = "#/components/schemas/{model}"


def install_schemas(app: FastAPI, *models: type[BaseModel]) -> None:
    """Wrap ``app.openapi`` so that the generated schema's components hold ``models``."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                model_schema = model.model_json_schema(ref_template=REF_TEMPLATE)
                components.update(model_schema.pop("$defs", {}))
                components[model.__name__] = model_schema
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
