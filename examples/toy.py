"""Seed 000's toy examples as a script: `python examples/toy.py` (same as `polysense demo toy`).

Three hand-made image vectors and three text queries live in one feature space
(red, round, vehicle); the image with the highest cosine similarity is the retrieved one.
"""

from polysense.demo import TOY_TEXTS, fusion_lines, rank_images

for line in fusion_lines():
    print(line)
for text_name, text_vec in TOY_TEXTS.items():
    print(f"\nQuery text: {text_name}")
    for score, image_name in rank_images(text_vec):
        print(f" {image_name}: {score:.4f}")
