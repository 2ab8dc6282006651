"""`python -m stagewise.pipeline` is the same as the `pipeline` console script."""
import sys

from stagewise.pipeline.cli import main

if __name__ == "__main__":  # spawn workers (DataLoader, process pools) import this module again
    sys.exit(main())
