"""Checkpoint formats: safetensors header scan, one reader for every FP8 dialect, streaming writers."""

from .dialects import (
    COMFY_QUANT,
    COMFY_SCALED,
    DIALECTS,
    HIGH_PRECISION,
    PLAIN_FP8,
    SCALE_ALIASES,
    WEIGHT_SCALE,
    CheckpointScan,
    LayerInfo,
    infer_config,
)
from .header import CheckpointError, SafetensorsHeader, TensorInfo, read_header
from .reader import Fp8Checkpoint, load_checkpoint, scan_checkpoint
from .writer import OUTPUT_FORMATS, ConvertReport, convert_checkpoint

__all__ = [
    "COMFY_QUANT",
    "COMFY_SCALED",
    "DIALECTS",
    "HIGH_PRECISION",
    "OUTPUT_FORMATS",
    "PLAIN_FP8",
    "SCALE_ALIASES",
    "WEIGHT_SCALE",
    "CheckpointError",
    "CheckpointScan",
    "ConvertReport",
    "Fp8Checkpoint",
    "LayerInfo",
    "SafetensorsHeader",
    "TensorInfo",
    "convert_checkpoint",
    "infer_config",
    "load_checkpoint",
    "read_header",
    "scan_checkpoint",
]
