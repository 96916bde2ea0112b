"""The training command, one job per module (imports run cli -> options, loop -> objective,
checkpoint -> evaluate -> config, vae_fast.data; no circle):

- cli: `main` and `run` (exit statuses, one-line errors);
- options: the parser, its argument types and help;
- config: the options and the data resolved into a frozen Config, and the run checks;
- objective: the model and its loss (--bound, --num-samples, --estimator) in one module;
- loop: the optimizer step and the epoch loop;
- checkpoint: checkpoint.pt and metrics.jsonl, --resume;
- evaluate: the test ELBO, the importance-weighted log-likelihood, the pictures.
"""

from vae_fast.train.cli import build_parser, main, run

__all__ = ["build_parser", "main", "run"]
