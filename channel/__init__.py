"""Emulated network links: pure link models and the TCP proxy that applies them."""
