"""``python -m normlab.collect PATH... --by KEY,KEY [--metric M] [--baseline KEY=VALUE]``: see
:func:`main`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from normlab.collect.figure import plot_groups
from normlab.collect.run_sources import collect_runs
from normlab.collect.summary import Baseline, left_out, markdown, summarize, write_csv
from normlab.errors import ConfigError

DESCRIPTION = """Tabulate finished runs: n, mean ± std per group of --by's config keys, and against
--baseline the difference with its 95 % Welch confidence interval. Reads Hydra run dirs, multirun
dirs (basic, Optuna, Slurm launcher) and offline wandb runs. Failed and unfinished runs are listed
under the table."""


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m normlab.collect", description=DESCRIPTION)
    parser.add_argument("paths", nargs="+", type=Path, help="run dirs, multirun dirs, wandb dirs")
    parser.add_argument("--by", required=True, help="config keys to group by, comma-separated")
    parser.add_argument("--metric", default="test/acc", help="the metric (default test/acc)")
    parser.add_argument("--baseline", help="the group to compare with, KEY=VALUE (KEY in --by)")
    parser.add_argument(
        "--margin",
        type=float,
        help="judge 'equivalent to the baseline within ±MARGIN' instead of a direction",
    )
    parser.add_argument("--digits", type=int, default=4, help="decimals shown (default 4)")
    parser.add_argument("--csv", type=Path, help="also write the table as CSV here")
    parser.add_argument("--plot", type=Path, help="also draw every group's runs and 95 %% CI here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Print the table (markdown), then the runs left out of it; exit 2 with one line for a bad
    path, key or metric."""
    args = parse_arguments(argv)
    by = [key.strip() for key in args.by.split(",") if key.strip()]
    try:
        if not by:
            raise ConfigError("--by: name at least one config key, e.g. --by norm.name")
        if args.margin is not None and (args.baseline is None or args.margin <= 0):
            raise ConfigError("--margin: needs --baseline and a positive number")
        baseline = args.baseline and Baseline.parse(args.baseline, by, args.margin)
        runs = collect_runs(args.paths)
        rows = summarize(runs, by, args.metric, baseline or None)
    except ConfigError as error:
        print(f"normlab: configuration error: {error}", file=sys.stderr)
        sys.exit(2)
    lines = markdown(rows, by, args.metric, baseline or None, args.digits)
    missing = left_out(runs, args.metric)
    if missing:
        lines += ["", f"Not in the table ({len(missing)} of {len(runs)} runs):", *missing]
    print("\n".join(lines))
    if args.csv:
        write_csv(args.csv, rows, by, args.metric)
    if args.plot:
        cells = {", ".join(row.group): row.cell for row in rows}
        title = f"{args.metric} by {', '.join(by)}: every run a dot, the mean with its 95 % CI"
        plot_groups(cells, args.metric, title, args.plot)


if __name__ == "__main__":
    main()
