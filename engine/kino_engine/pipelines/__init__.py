"""kino's denoising loops, one module per model family (wan.py: Wan 2.1 text-to-video)."""
