"""Evaluation: zero-shot, retrieval, captioning, VQA, hallucination, compositional."""
