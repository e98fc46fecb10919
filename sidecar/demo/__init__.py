"""The self-contained demo."""

from sidecar.demo._run import run_demo

__all__ = ["run_demo"]
