"""``make bench`` entry for bench/rollout_decisions.py (same flags)."""

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    runpy.run_path(str(Path(__file__).with_name("rollout_decisions.py")), run_name="__main__")
