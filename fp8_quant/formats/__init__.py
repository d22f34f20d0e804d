"""Checkpoint formats: safetensors header scan, the dialects' registry, one reader for every dialect, streaming
writers."""

from .dialects import (
    COMFY_QUANT,
    COMFY_SCALED,
    DEFAULT_OUTPUT_FORMAT,
    DIALECTS,
    HIGH_PRECISION,
    OUTPUT_DIALECTS,
    OUTPUT_FORMATS,
    PLAIN_FP8,
    SCALE_ALIASES,
    WEIGHT_SCALE,
    Dialect,
    dialect_named,
)
from .header import CheckpointError, SafetensorsHeader, TensorInfo, read_header
from .reader import Fp8Checkpoint, load_checkpoint, scan_checkpoint
from .scan import CheckpointScan, LayerInfo, infer_config
from .writer import ConvertReport, convert_checkpoint

__all__ = [
    "COMFY_QUANT",
    "COMFY_SCALED",
    "DEFAULT_OUTPUT_FORMAT",
    "DIALECTS",
    "HIGH_PRECISION",
    "OUTPUT_DIALECTS",
    "OUTPUT_FORMATS",
    "PLAIN_FP8",
    "SCALE_ALIASES",
    "WEIGHT_SCALE",
    "CheckpointError",
    "CheckpointScan",
    "ConvertReport",
    "Dialect",
    "Fp8Checkpoint",
    "LayerInfo",
    "SafetensorsHeader",
    "TensorInfo",
    "convert_checkpoint",
    "dialect_named",
    "infer_config",
    "load_checkpoint",
    "read_header",
    "scan_checkpoint",
]
