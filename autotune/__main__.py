"""``python -m autotune``: the same program as ``kwb``."""
from autotune.cli import app

if __name__ == "__main__":
    app(prog_name="python -m autotune")
