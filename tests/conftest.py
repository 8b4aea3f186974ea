import sys
from pathlib import Path

# Helper modules (test plugins) beside the tests import by plain name under importlib mode.
sys.path.insert(0, str(Path(__file__).parent / "core"))
