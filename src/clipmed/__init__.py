"""clipmed: adapt CLIP-style image-text models to medical imaging and measure how much each adaptation helps.

Layers, imported one way only:  data -> models -> objectives -> training -> evaluation -> report -> pipeline -> cli.
"""

__version__ = "0.1.0"
