import sys
from pathlib import Path

# the text-to-image stand-in bundle lives with the training tests' stand-ins
sys.path.insert(0, str(Path(__file__).parents[1] / "training"))
