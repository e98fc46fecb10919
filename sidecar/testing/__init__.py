"""Helpers for tests of code that uses the sidecar: a real daemon in a subprocess."""

from sidecar.testing._daemon import DaemonProcess, free_port

__all__ = ["DaemonProcess", "free_port"]
