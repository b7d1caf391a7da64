"""Embedding index over faiss with a SQLite metadata store."""
