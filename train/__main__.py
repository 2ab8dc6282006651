"""`python -m stagewise.train [--config FILE] [--section.key=value ...]`, also under
`torchrun --nproc-per-node N -m stagewise.train`."""
import sys

from stagewise.train.cli import main

sys.exit(main())
