"""Typed, validated view of params.yaml: the only place params are read.

`load_params()` returns a `Params` object with one section per stage. Every problem in the file
(wrong type, unknown key, impossible combination) is gathered into a single `ParamsError` whose
message names each offending key, so a user fixes params.yaml in one pass.

The package: `schema` (the sections and their own rules), `rules` (rules that read the teacher's
config.json), `paths` (output-location safety), `stages` (the params each stage declares),
`loading` (YAML, overrides, validation), `redaction` (no secret in what is written or
logged).
"""

from components.config.loading import (
    DEFAULT_PARAMS,
    apply_overrides,
    load_params,
    parse_override,
    validate,
)
from components.config.paths import PROTECTED_ENTRIES
from components.config.rules import layer_map_problem, teacher_layer_count
from components.config.schema import (
    QUANTIZABLE_OPS,
    SPECIAL_TOKENS,
    Export,
    Params,
    ParamsError,
    Paths,
    Prepare,
    StaticInt8,
    TensorRT,
    Tokenizer,
    merge_min_tokens,
)
from components.config.stages import STAGE_PARAMS, stage_params

__all__ = [
    "DEFAULT_PARAMS",
    "Export",
    "PROTECTED_ENTRIES",
    "Params",
    "ParamsError",
    "Paths",
    "Prepare",
    "QUANTIZABLE_OPS",
    "SPECIAL_TOKENS",
    "STAGE_PARAMS",
    "StaticInt8",
    "TensorRT",
    "Tokenizer",
    "apply_overrides",
    "layer_map_problem",
    "load_params",
    "merge_min_tokens",
    "parse_override",
    "stage_params",
    "teacher_layer_count",
    "validate",
]
