"""`python -m train [--config FILE] [--section.key=value ...]`, also under `torchrun --nproc-per-node N -m train`."""
import sys

from stagewise.train.loop import main

sys.exit(main())
