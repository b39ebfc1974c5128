"""The FastAPI layer: lifespan, dependency, router and problem+json errors."""
