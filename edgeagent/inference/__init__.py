"""Inference: runtime seam (tflite-runtime | ai-edge-litert), preprocessing, runner, model store."""
