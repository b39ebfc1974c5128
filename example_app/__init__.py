"""A small orders service on fastapi-catga: run it with ``uvicorn example_app.main:app``."""
