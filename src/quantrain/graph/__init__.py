"""One graph view of a model, captured with ``torch.export``, that every analysis reads (see :mod:`.model_graph`)."""

from quantrain.graph.capture import CaptureError, capture, capturing, example_arguments, is_capturing, output_tensors
from quantrain.graph.model_graph import Call, CallKind, ModelGraph

__all__ = [
    "Call",
    "CallKind",
    "CaptureError",
    "ModelGraph",
    "capture",
    "capturing",
    "example_arguments",
    "is_capturing",
    "output_tensors",
]
