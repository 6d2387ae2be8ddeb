"""Figures: slice mosaics, curves, memory charts."""
