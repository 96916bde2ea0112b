"""The command line: ``python -m vae_fast.train`` (or ``vae-fast-train``) parses its
options, loads the data, resolves the Config, trains, and turns every failure into a
one-line message and an exit status.

One process:   python -m vae_fast.train --data digits --out runs/demo
Many:          torchrun --nproc_per_node=4 -m vae_fast.train --data mnist/ --batch-size 4096
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from typing import NoReturn

import torch
import torch.distributed as dist

import vae_fast
from vae_fast.data import DataError, Dataset, DataWarning, load_dataset, prepare
from vae_fast.train.config import ConfigError, launched_as_rank_0, resolve, start_runtime
from vae_fast.train.loop import Diverged, Interrupted, train
from vae_fast.train.options import EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_USAGE, build_parser


def run(argv: Sequence[str] | None = None) -> dict:
    """Parse `argv`, train, and return the final metrics (the last metrics.jsonl record).

    Failures raise SystemExit with a one-line message on stderr and the status of
    EPILOG: 2 for bad options or data, 1 when the training diverges, 130 on Ctrl-C.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        data = _load_data(args.data, args.data_scale, parser.prog)
        prep = prepare(data, args.likelihood, args.data)
        rt = start_runtime(args.device)
    except (DataError, ConfigError) as error:
        _refuse(parser, error, launched_as_rank_0())
    except KeyboardInterrupt:
        parser.exit(EXIT_INTERRUPTED, f"{parser.prog}: interrupted\n")
    threads = torch.get_num_threads()
    try:
        cfg = resolve(args, data, prep, rt)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        with vae_fast.backend(cfg.backend):
            result = train(cfg, data, prep, rt)
        if rt.distributed:
            # Rank 0 writes the last checkpoint, the log-likelihood and the pictures
            # alone: the others wait for it, so that no rank tears the process group
            # down (and exits) while another still holds it.
            dist.barrier()
        return result
    except (DataError, ConfigError) as error:
        _refuse(parser, error, rt.main)
    except Diverged as error:
        parser.exit(EXIT_DIVERGED, f"{parser.prog}: error: {error}\n" if rt.main else None)
    except Interrupted as error:
        parser.exit(EXIT_INTERRUPTED, f"{parser.prog}: {error}\n" if rt.main else None)
    except KeyboardInterrupt:  # before the training loop: building, compiling, resuming
        parser.exit(EXIT_INTERRUPTED, f"{parser.prog}: interrupted\n" if rt.main else None)
    finally:
        torch.set_num_threads(threads)  # callers in the same process keep their setting
        if rt.distributed:
            dist.destroy_process_group()


def _refuse(parser: argparse.ArgumentParser, error: Exception, main: bool) -> NoReturn:
    """Bad options or data: status 2, with the one-line error from the main process only
    (under torchrun every rank finds the same error)."""
    if main:
        parser.error(str(error))
    parser.exit(EXIT_USAGE)


def _load_data(spec: str, scale: float | None, prog: str) -> Dataset:
    """load_dataset, with its DataWarnings printed as one line each on stderr (rank 0)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        data = load_dataset(spec, scale=scale)
    for w in caught:
        if not issubclass(w.category, DataWarning):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        elif launched_as_rank_0():
            print(f"{prog}: warning: {' '.join(str(w.message).split())}", file=sys.stderr)
    return data


def main(argv: Sequence[str] | None = None) -> None:
    """The console script: ``vae-fast-train`` (``python -m vae_fast.train``)."""
    run(argv)
