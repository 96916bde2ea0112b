"""The command-line conventions of the bench scripts: defaults that depend on --quick or
--device, --help that shows every default as it is typed, the options that
bench/ops.py and bench/train.py both take, and the --threads of the smaller scripts.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Later:
    """A default that depends on --quick or --device cuda, picked once the command line is
    parsed (`fill_defaults`); --help shows every variant."""

    full: object
    quick: object = None  # None: as full
    cuda: object = None

    def pick(self, quick: bool, cuda: bool) -> object:
        if quick and self.quick is not None:
            return self.quick
        return self.cuda if cuda and self.cuda is not None else self.full

    def __str__(self) -> str:
        text = show(self.full)
        if self.cuda is not None:
            text += f"; --device cuda: {show(self.cuda)}"
        return text + (f"; --quick: {show(self.quick)}" if self.quick is not None else "")


def show(value: object) -> str:
    """A value as it is typed on the command line."""
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """ArgumentDefaultsHelpFormatter's "(default: ...)", written as the value is typed."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        if default is None or default is False or default == argparse.SUPPRESS:
            return text
        return f"{text} (default: {show(default).replace('%', '%%')})"  # help is %-formatted


def add_run_options(
    p: argparse.ArgumentParser, *, runs: str, per: str, quick: str, min_time: Later, warmup: Later
) -> None:
    """The options both timing scripts take. `runs` says what --vae-backend chooses, `per`
    what --min-time is per, `quick` what --quick does."""
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run")
    p.add_argument(
        "--vae-backend",
        choices=("auto", "fused", "reference"),
        default="auto",
        help=f"what {runs}; auto: the kernels if vae_fast._C is built, else the reference "
        "as a labelled stand-in",
    )
    p.add_argument(
        "--min-time",
        type=float,
        default=min_time,
        help=f"seconds of timed calls per {per}",
    )
    p.add_argument("--rounds", type=int, default=Later(5, quick=3), help="interleaved rounds")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed calls first")
    p.add_argument("--threads", type=int, help="torch threads (default: every available core)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--append", action="store_true", help="add this run to the --json file")
    p.add_argument("--markdown", help="write the tables here (they are printed anyway)")
    p.add_argument("--quick", action="store_true", help=quick)


def parse_with_threads(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse the command line with a --threads option added, and apply it (the smaller
    scripts keep torch's thread count by default)."""
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
    for name, value in vars(args).items():
        if isinstance(value, Later):
            setattr(args, name, value.pick(args.quick, args.device == "cuda"))
    return args
