"""Stage 6: the engines (`predictor`: PyTorch checkpoint or ONNX Runtime), segmenting images
of any size (`segment`), `urbanseg predict` and `urbanseg export`."""
