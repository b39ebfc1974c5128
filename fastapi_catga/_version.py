"""The package version: hatch reads it here; `bootstrap` imports it without a cycle through __init__."""

__version__ = "0.2.0"
