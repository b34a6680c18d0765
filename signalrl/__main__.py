"""`python -m signalrl ...`, the entry point torchrun launches:
`torchrun --nproc_per_node=N -m signalrl train RECIPE.yaml`."""

from __future__ import annotations

from torch.distributed.elastic.multiprocessing.errors import record

from signalrl.cli import main

if __name__ == "__main__":
    # under torchrun, an uncaught error's traceback is written where torchrun's failure
    # summary shows it (with the rank that failed)
    record(main)()
