"""Online DNR reranking service: FastAPI over ONNX Runtime. Imports nothing from training/ and no torch."""
