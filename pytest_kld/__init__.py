"""pytest-kld: KL(reference || quant) regression testing for quantised MLX language models.

Importing this package is cheap: mlx and mlx_lm are imported only when a KLD feature runs.
"""

from importlib.metadata import PackageNotFoundError, version

try:  # one source of truth: the version in pyproject.toml, as installed
    __version__ = version("pytest-kld")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
