"""Sweeps: TOML grids (``spec``), the SQLite results store (``store``), executors and the driver."""
