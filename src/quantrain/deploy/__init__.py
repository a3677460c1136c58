"""Deploy: read what training produced and turn it into an artifact that runs in integer arithmetic."""

from quantrain.deploy.export import ExportReport, export_onnx
from quantrain.deploy.parity import LayerParity, OutputParity, ParityReport, check_parity

__all__ = ["ExportReport", "LayerParity", "OutputParity", "ParityReport", "check_parity", "export_onnx"]
