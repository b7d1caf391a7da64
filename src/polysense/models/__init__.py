"""Models: one family per file (vit, text, clip, audio, video, fusion, vlm, hf)."""
