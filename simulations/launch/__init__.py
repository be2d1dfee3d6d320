"""Launching Flower: a private simulation SuperLink and `flwr run` on it, stopped by PID."""
