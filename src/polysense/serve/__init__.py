"""HTTP service (FastAPI) and the web page; needs the `serve` extra."""
