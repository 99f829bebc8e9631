"""Shipped experiment and sweep definitions (YAML), installed as package data."""
