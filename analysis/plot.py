"""`alignbench plot DIR`: the paper-style figures and tables of an experiment into DIR/figures/.

From the runs' local files (`metrics.json`, `history.jsonl`, `samples.jsonl`), or with
`--wandb ENTITY/PROJECT` from the W&B API (samples stay local, so the head-to-head figure needs
the directory). Each figure is drawn when the runs it needs are there; the others are listed,
with what they need, in DIR/figures/index.md and on the console. See docs/README.md for the
figures, and experiments/paper/ for a sweep per figure.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from alignbench.config import ConfigError

# (number, file stem, drawing function in figures.py); figure 9 is the results table.
FIGURES = (
    ("1", "win_rate_vs_sft", "draw_win_rates"),
    ("2", "head_to_head", "draw_head_to_head"),
    ("2b", "paired", "draw_paired"),
    ("3", "reward_vs_kl", "draw_reward_vs_kl"),
    ("4", "win_rate_vs_temperature", "draw_temperatures"),
    ("5", "win_rate_vs_model_size", "draw_model_sizes"),
    ("6", "helpfulness_vs_harmlessness", "draw_iterations"),
    ("7", "overoptimization", "draw_overoptimization"),
    ("8", "training_curves", "draw_training_curves"),
    ("8b", "gold_vs_samples", "draw_sample_efficiency"),
)


# The drawing functions that take the number of bootstrap resamples.
_BOOTSTRAPPED = ("draw_win_rates", "draw_head_to_head", "draw_paired", "draw_reward_vs_kl")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="an experiment directory (e.g. runs/quickstart); figures go to DIR/figures/")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", default=None, help="read the runs from this W&B project instead of DIR's files (figures still go to DIR/figures/)")
    parser.add_argument("--formats", default="png,pdf", help="comma-separated figure formats (default: png,pdf)")


def main(args) -> None:
    formats = tuple(f.strip().lower() for f in args.formats.split(",") if f.strip())
    written = plot_directory(Path(args.directory), wandb_path=args.wandb, formats=formats)
    print(f"{len(written)} files in {Path(args.directory) / 'figures'}")


def _check_formats(formats: tuple[str, ...]) -> None:
    import matplotlib.pyplot as plt

    supported = plt.gcf().canvas.get_supported_filetypes()
    plt.close("all")
    bad = [f for f in formats if f not in supported]
    if not formats or bad:
        raise ConfigError(f"--formats {','.join(formats)!s}: unknown format(s) {', '.join(bad) or '(none given)'}; accepted: {', '.join(sorted(supported))}")


def plot_directory(directory: Path, wandb_path: str | None = None, formats: tuple[str, ...] = ("png", "pdf"), n_boot: int = 1000) -> list[Path]:
    """Draw every figure the runs support into `directory/figures/`; returns the files written.

    Figures 1–8b as `formats` (PNG and PDF by default), their tables as Markdown and LaTeX (the
    paired comparisons and the matched-KL table also as CSV), the results table (figure 9) as
    `results.md` / `results.tex` / `results.csv`, and `index.md` with each figure's caption and
    the figures skipped, with what they need. Intervals over several seeds are two-level
    bootstraps (seeds, then prompts) with `n_boot` resamples; see analysis/stats.py.
    """
    from alignbench.analysis import figures
    from alignbench.analysis.runs import (
        load_local_runs,
        load_wandb_runs,
        single_experiment,
    )
    from alignbench.analysis.style import Skipped, paper_style, save
    from alignbench.analysis.tables import format_table, results_table

    directory = Path(directory)
    if wandb_path is not None:
        runs = load_wandb_runs(wandb_path)
        where = f"W&B project {wandb_path}"
    else:
        if not directory.is_dir():
            raise ConfigError(f"results directory not found: {directory}")
        runs = load_local_runs(directory)
        where = str(directory)
    if not runs:
        raise ConfigError(f"no finished runs (metrics.json) in {where}")
    runs = single_experiment(runs, where)
    out = directory / "figures"
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    command = f"alignbench plot {directory}" + (f" --wandb {wandb_path}" if wandb_path else "")
    index = [f"# Figures of {runs[0].experiment}", "", f"From {len(runs)} finished runs in {where}. Regenerate with `{command}`.", ""]
    skipped = []
    with paper_style():
        _check_formats(formats)
        for number, stem, function in FIGURES:
            try:
                drawn = getattr(figures, function)(runs, **({"n_boot": n_boot} if function in _BOOTSTRAPPED else {}))
            except Skipped as reason:
                skipped.append((number, stem, str(reason)))
                print(f"figure {number} ({stem}) skipped: {reason}")
                continue
            files = save(drawn.figure, out / drawn.stem, formats)
            for name, text in drawn.tables.items():
                (out / name).write_text(text)
                files.append(out / name)
            written += files
            print(f"figure {number} ({drawn.title}): {', '.join(str(f) for f in files)}")
            index += [f"## Figure {number}. {drawn.title}", "", f"![{drawn.title}]({drawn.stem}.{formats[0]})", "", drawn.caption, "",
                      "Files: " + ", ".join(f"`{f.name}`" for f in files), ""]
    table = results_table(runs, n_boot=n_boot)
    for suffix, text in (("md", f"{table.header}\n\n" + format_table(table.frame, "md") + f"\n{table.notes}\n"),
                         ("tex", f"% {table.header}\n% {table.notes}\n" + format_table(table.frame, "latex")),
                         ("csv", table.numbers.to_csv(index=False))):
        path = out / f"results.{suffix}"
        path.write_text(text)
        written.append(path)
    print(f"figure 9 (results table): {out / 'results.md'}, {out / 'results.tex'}, {out / 'results.csv'}")
    index += ["## Figure 9. Results table", "", (out / "results.md").read_text(), ""]
    if skipped:
        index += ["## Skipped", ""] + [f"- Figure {number} (`{stem}`): {reason}" for number, stem, reason in skipped] + [""]
    (out / "index.md").write_text("\n".join(index))
    written.append(out / "index.md")
    return written
