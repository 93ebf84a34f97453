"""Running models: the torch interpreter, training, onnxruntime sessions, validation."""
