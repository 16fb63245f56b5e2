"""`python -m l2sm_kernels.train` / `torchrun ... -m l2sm_kernels.train` (see loop.py)."""
from .loop import main

if __name__ == "__main__":
    main()
