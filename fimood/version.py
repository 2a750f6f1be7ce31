"""The fimood version: one place, read by the package, its build and every table it commits."""

__version__ = "0.3.0"
