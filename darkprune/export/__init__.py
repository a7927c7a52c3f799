"""Exporting darkprune models to other formats: ONNX (`export_onnx`, needs the optional `onnx` package)."""
from .onnx import DEFAULT_OPSET, build_onnx, export_onnx, onnx_refusal

__all__ = ["DEFAULT_OPSET", "build_onnx", "export_onnx", "onnx_refusal"]
