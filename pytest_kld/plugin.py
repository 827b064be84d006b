"""pytest-kld's pytest plugin (options, fixtures, hooks). No mlx import at module top."""
