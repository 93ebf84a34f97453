"""Model and data loading: ONNX files, torch modules and programs, calibration data."""
