"""Seed 000's two toy examples: concatenation fusion and cosine-similarity image-text matching.

`polysense demo toy` prints them in the tutorial's own output format; `examples/toy.py` is the
same code as a script. Vectors are hand-made features, not model outputs: they show the idea
(same space -> highest cosine wins) before any training.
"""

from __future__ import annotations

import numpy as np

# Image features: brightness, redness, roundness.
FUSION_IMAGE = np.array([0.8, 0.7, 0.2])
# Text features: fashion sense, sporty feel, business feel.
FUSION_TEXT = np.array([0.6, 0.2, 0.1])

# Three image vectors and three text queries in one hand-made space (red, round, vehicle).
TOY_IMAGES = {
    "red_apple.jpg": np.array([0.9, 0.1, 0.0]),
    "blue_car.jpg": np.array([0.1, 0.2, 1.0]),
    "orange_ball.jpg": np.array([0.8, 0.9, 0.0]),
}
TOY_TEXTS = {
    "red fruit": np.array([0.95, 0.2, 0.0]),
    "vehicle": np.array([0.0, 0.1, 1.0]),
    "round toy": np.array([0.7, 0.95, 0.0]),
}


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def fusion_lines() -> list[str]:
    fused = np.concatenate([FUSION_IMAGE, FUSION_TEXT])  # early fusion by concatenation: (6,)
    return [
        f"Image features: {FUSION_IMAGE}",
        f"Text features: {FUSION_TEXT}",
        f"Fused features: {fused}",
        f"Fused feature shape: {fused.shape}",
    ]


def rank_images(query: np.ndarray) -> list[tuple[float, str]]:
    """All images scored against one text vector, best first."""
    scores = [(cosine_similarity(query, vec), name) for name, vec in TOY_IMAGES.items()]
    return sorted(scores, reverse=True)


def matching_lines() -> list[str]:
    lines: list[str] = []
    for text_name, text_vec in TOY_TEXTS.items():
        lines.append(f"Query text: {text_name}")
        lines += [f" {image_name}: {score:.4f}" for score, image_name in rank_images(text_vec)]
    return lines
