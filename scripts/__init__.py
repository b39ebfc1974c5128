"""Repository scripts written in Python, run from the repository root (``python -m scripts.<name>``)."""
