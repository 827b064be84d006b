"""pytest-kld: KL(reference || quant) regression testing for quantised MLX language models.

Importing this package is cheap: mlx and mlx_lm are imported only when a KLD feature runs.
"""

__version__ = "0.1.0"
