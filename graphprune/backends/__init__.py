"""Format backends: apply a plan to an ONNX model, an nn.Module or an ExportedProgram."""
