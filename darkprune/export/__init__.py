"""Exporting darkprune models to other formats: ONNX (`export_onnx`, needs the optional `onnx` package).

The exporter pulls in the numba engine; it is loaded on first use, so that `darkprune --help` (which reads the
opset defaults below) stays fast.
"""
DEFAULT_OPSET = 17      # read by OpenCV 5's ONNX importer, ONNX Runtime >= 1.12, TensorRT 8.6+, OpenVINO, ncnn's pnnx
MIN_OPSET = 13          # Softmax over one axis; Slice/Clip/Pad/Squeeze with tensor inputs; Resize with scales

__all__ = ["DEFAULT_OPSET", "MIN_OPSET", "build_onnx", "export_onnx", "onnx_refusal"]


def __getattr__(name):
    if name in ("build_onnx", "export_onnx", "onnx_refusal", "require_onnx"):
        from . import onnx as exporter
        return getattr(exporter, name)
    raise AttributeError(f"module 'darkprune.export' has no attribute {name!r}")
