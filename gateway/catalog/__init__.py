"""The data catalog: declared fields, datasets, purposes ("最小必须")."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

import yaml
from pydantic import ValidationError

from gateway.catalog.model import (
    Catalog,
    Dataset,
    DimensionSpec,
    FieldType,
    MeasureSpec,
    Purpose,
    Sensitivity,
    Source,
    SourceField,
    Transform,
)
from gateway.errors import CatalogError

__all__ = [
    "Catalog",
    "Dataset",
    "DimensionSpec",
    "FieldType",
    "MeasureSpec",
    "Purpose",
    "Sensitivity",
    "Source",
    "SourceField",
    "Transform",
    "default_catalog",
    "load_catalog",
]


def load_catalog(path: Path | None = None) -> Catalog:
    """Load and validate a catalog file (the packaged one when ``path`` is None)."""
    if path is None:
        text = resources.files("gateway.catalog").joinpath("catalog.yaml").read_text("utf-8")
        origin = "catalog.yaml"
    else:
        try:
            text = path.read_text("utf-8")
        except OSError as exc:
            raise CatalogError(f"cannot read catalog {path.name}") from exc
        origin = path.name
    try:
        raw = yaml.safe_load(text)
        return Catalog.model_validate(raw)
    except (yaml.YAMLError, ValidationError) as exc:
        raise CatalogError(f"invalid catalog {origin}: {exc}") from exc


@lru_cache(maxsize=1)
def default_catalog() -> Catalog:
    return load_catalog()
