"""Pixels: the pure preprocessing shared by training and inference, training augmentation, and
the printed digits rendered from fonts. No I/O, no Ray; imports nothing of the project but
itself and `errors`.
"""
