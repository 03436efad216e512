"""The typed checks every config goes through: one dtype table, field types with their ranges, and schemas as
pydantic dataclasses whose first violation becomes a one-line `PipelineError`.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import ConfigDict, Field, Strict, TypeAdapter, ValidationError

from llama.errors import PipelineError

Dtype = Literal["float32", "float16", "bfloat16"]
DTYPES = get_args(Dtype)

# YAML already gives numbers their type, so integers are strict: `3.5`, `"3"` or `true` is not a step count.
PositiveInt = Annotated[int, Strict(), Field(ge=1)]
NonNegativeInt = Annotated[int, Strict(), Field(ge=0)]
FiniteFloat = Annotated[float, Strict(), Field(allow_inf_nan=False)]
PositiveFloat = Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Strict(), Field(ge=0, lt=1)]   # dropout rates, Adam betas
SCHEMA = ConfigDict(extra="forbid")                         # a misspelt key is an error, not a silent default


def build(schema, data, where: str):
    """`schema` (a pydantic dataclass) from a mapping, or a one-line error naming the first bad setting."""
    if not isinstance(data, dict):
        raise PipelineError(f"{where} must be a mapping of settings, not {type(data).__name__}")
    try:
        return TypeAdapter(schema).validate_python(data)
    except ValidationError as err:
        raise PipelineError(f"{where}: {describe(err)}") from None


def describe(err: ValidationError) -> str:
    """The first error of a validation as `key.path: what is wrong (got value)`."""
    first = err.errors(include_url=False)[0]
    *section, leaf = [str(part) for part in first["loc"] if part != "[key]"] or ["settings"]
    if first["type"] == "unexpected_keyword_argument":
        return f"unknown setting {leaf}" + (f" in {'.'.join(section)}" if section else "")
    if first["type"] == "missing":
        return f"{'.'.join([*section, leaf])} is required"
    message = first["msg"][0].lower() + first["msg"][1:]
    got = "" if isinstance(first["input"], (dict, list)) else f" (got {first['input']!r})"
    return f"{'.'.join([*section, leaf])}: {message}{got}"
