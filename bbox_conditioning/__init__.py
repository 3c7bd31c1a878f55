"""Bounding-box conditioning: box tensors, class vocabulary, Fourier box tokens, gated self-attention.

A leaf package: it depends on torch and einops only.
"""
