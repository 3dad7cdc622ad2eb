"""Typed model of the catalog: raw source fields, query datasets and purposes."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "Catalog",
    "Dataset",
    "Defaults",
    "DimensionSpec",
    "FieldType",
    "MeasureSpec",
    "Purpose",
    "Sensitivity",
    "Source",
    "SourceField",
    "Transform",
]


class Sensitivity(StrEnum):
    DIRECT_IDENTIFIER = "direct_identifier"
    QUASI_IDENTIFIER = "quasi_identifier"
    SENSITIVE = "sensitive"
    PLAIN = "plain"


class Transform(StrEnum):
    PSEUDONYMIZE = "pseudonymize"
    DROP = "drop"
    BIRTH_YEAR = "birth_year"
    ADMDVS = "admdvs"
    KEEP = "keep"
    SCAN = "scan"


class FieldType(StrEnum):
    STRING = "string"
    DATE = "date"
    TIMESTAMP = "timestamp"
    DECIMAL = "decimal"
    INTEGER = "integer"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceField(_Strict):
    type: FieldType
    sensitivity: Sensitivity
    transform: Transform
    title: str
    nullable: bool = False

    @model_validator(mode="after")
    def _identifiers_never_kept(self) -> SourceField:
        if self.sensitivity is Sensitivity.DIRECT_IDENTIFIER and self.transform in (
            Transform.KEEP,
            Transform.SCAN,
        ):
            raise ValueError("a direct identifier must be pseudonymized, generalized or dropped")
        return self


class Source(_Strict):
    title: str
    fields: dict[str, SourceField]


class DimensionSpec(_Strict):
    title: str
    type: FieldType = FieldType.STRING
    values: list[str] | None = None


class MeasureSpec(_Strict):
    title: str


class Dataset(_Strict):
    title: str
    table: str
    person_key: str
    dimensions: dict[str, DimensionSpec]
    measures: dict[str, MeasureSpec]

    def fields(self) -> set[str]:
        return set(self.dimensions) | set(self.measures)


class Purpose(_Strict):
    title: str
    legal_basis: str
    max_grant_days: int = Field(gt=0, le=3660)
    necessary_fields: dict[str, str]


class Defaults(_Strict):
    min_cell_size: int = Field(ge=1)
    min_cell_size_floor: int = Field(ge=1)
    max_rows: int = Field(ge=1)
    query_timeout_ms: int = Field(ge=1)


class Catalog(_Strict):
    version: int
    sources: dict[str, Source]
    datasets: dict[str, Dataset]
    purposes: dict[str, Purpose]
    defaults: Defaults

    @model_validator(mode="after")
    def _consistent(self) -> Catalog:
        known = set().union(*(d.fields() for d in self.datasets.values()))
        for name, purpose in self.purposes.items():
            unknown = set(purpose.necessary_fields) - known
            if unknown:
                raise ValueError(f"purpose {name} names unknown fields: {sorted(unknown)}")
            for field, why in purpose.necessary_fields.items():
                if not why.strip():
                    raise ValueError(f"purpose {name}: field {field} lacks a justification")
        if self.defaults.min_cell_size < self.defaults.min_cell_size_floor:
            raise ValueError("defaults.min_cell_size is below min_cell_size_floor")
        for dname, ds in self.datasets.items():
            if ds.person_key in ds.fields():
                raise ValueError(
                    f"dataset {dname}: the person key may not be a dimension or measure"
                )
        return self

    def dataset(self, name: str) -> Dataset | None:
        return self.datasets.get(name)
