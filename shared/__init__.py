"""Contracts and helpers every Phyllome agent imports: subjects, messages, bus, metrics."""

__version__ = "0.1.0"
