"""Offline DNR pipeline: data, retriever, reranker training, evaluation and ONNX export (PyTorch)."""
