"""Data: the procedural world, readers, tokenizer, loader and curation."""
