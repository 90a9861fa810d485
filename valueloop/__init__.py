"""ValueLoop: customer intelligence for e-commerce shops."""

__version__ = "0.1.0"
