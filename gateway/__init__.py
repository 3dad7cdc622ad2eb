"""医保商保数据共享网关: a privacy-preserving data-sharing gateway."""

__version__ = "0.1.0"
__all__ = ["__version__"]
