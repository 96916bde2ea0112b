"""``python -m vae_fast.train``: the training command (see vae_fast.train.cli)."""

import sys

from vae_fast.train.cli import main

if __name__ == "__main__":
    main(sys.argv[1:])
