"""The format-agnostic data: the channel graph, the plan, ONNX IR helpers."""
