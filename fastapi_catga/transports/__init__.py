"""Transports: one Protocol (base.py), one module per broker."""
