"""The ``fxprune`` command line: a thin layer over the public API (each command is one or two calls).

    fxprune check CONFIG [--model SPEC]          fxprune.check.check_config
    fxprune schedule CONFIG [--epochs N | --steps N] [--plot out.png]
                                                 Pruner.schedule_table (fxprune.check.schedule_pruner)
    fxprune report CHECKPOINT                    fxprune.report.checkpoint_sparsity
    fxprune speedup --model SPEC [--config CONFIG] [--input-shape 1,3,224,224]
                                                 fxprune.check.prune_to_targets + fxprune.speedup_report

Exit codes: 0 ok; 2 bad arguments (click's usage message) or a bad config
(``fxprune.ConfigError``: its one line on stderr, no traceback); 1 any other
fxprune error (one line).
"""
from __future__ import annotations

import click

from fxprune.errors import ConfigError, PruningError, TraceError

__all__ = ["cli", "main"]

_MODEL_HELP = "torchvision:NAME, timm:NAME, hf:path/to/config.json or module.path:factory (random weights)"


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


class _Group(click.Group):
    """Turns fxprune's user errors into one line on stderr and an exit code, instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ConfigError as e:
            click.echo(f"fxprune: config error: {_one_line(e)}", err=True)
            ctx.exit(2)
        except (PruningError, TraceError, FileNotFoundError) as e:
            click.echo(f"fxprune: error: {_one_line(e)}", err=True)
            ctx.exit(1)


def _model(spec: str | None, param: str = "--model"):
    if spec is None:
        return None
    from fxprune.model_spec import build_model

    try:
        return build_model(spec)
    except ValueError as e:
        raise click.BadParameter(_one_line(e), param_hint=param) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fxprune", prog_name="fxprune")
def cli() -> None:
    """Pruning for PyTorch models, built on torch.fx: check configs, preview schedules, report sparsity and
    speed-up."""


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--model", "model_spec", metavar="SPEC", help=_MODEL_HELP)
@click.option("--no-prepare", is_flag=True, help="Only resolve weights; do not trace/prepare the model.")
def check(config: str, model_spec: str | None, no_prepare: bool) -> None:
    """Validate CONFIG; with --model, list which pruner takes which weight and why others are skipped."""
    from fxprune.check import check_config

    click.echo(str(check_config(config, _model(model_spec), prepare=not no_prepare)))


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--epochs", type=click.IntRange(min=1), help="Show goals for epochs 0..N-1.")
@click.option("--steps", type=click.IntRange(min=1), help="Show goals for optimizer steps 0..N-1.")
@click.option("--steps-per-epoch", type=click.IntRange(min=1),
              help="Convert between units when the config mixes epoch- and step-scheduled pruners.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Save a plot of the goals (PNG).")
def schedule(config: str, epochs: int | None, steps: int | None, steps_per_epoch: int | None,
             plot_path: str | None) -> None:
    """Print (and plot) every pruner's sparsity goal over epochs or steps."""
    from fxprune.check import plot_schedule, schedule_pruner

    if epochs is not None and steps is not None:
        raise click.UsageError("give --epochs or --steps, not both")
    pruner = schedule_pruner(config)
    pruner.steps_per_epoch = steps_per_epoch
    if epochs is None and steps is None:  # default: the config's own unit, up to its last end + 1
        by_step = all(p.by_step for p in pruner.pruner_configs)
        by = "step" if by_step else "epoch"
        n = max(p.window[1] for p in pruner.pruner_configs if p.by_step == by_step) + 2
    else:
        by, n = ("epoch", epochs) if epochs is not None else ("step", steps)
    try:
        table = pruner.schedule_table(n, by=by)
    except ValueError as e:  # a pruner scheduled in the other unit, and no --steps-per-epoch
        raise click.UsageError(f"{_one_line(e)} (or give --steps-per-epoch)") from None
    names = [p.name for p in pruner.pruner_configs]
    widths = [max(len(by), len(str(n - 1)))] + [max(len(x), 6) for x in names]
    click.echo("  ".join(h.rjust(w) for h, w in zip([by, *names], widths)))
    for row in table:
        cells = [str(row[by])] + [f"{row[x]:.4f}" for x in names]
        click.echo("  ".join(c.rjust(w) for c, w in zip(cells, widths)))
    if plot_path:
        plot_schedule(table, plot_path, title=f"sparsity goals: {config}")
        click.echo(f"plot saved to {plot_path}")


@cli.command()
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--all", "all_parameters", is_flag=True, help="List every tensor, not only the weight matrices.")
def report(checkpoint: str, all_parameters: bool) -> None:
    """Print the sparsity table of a saved state_dict (torch.save) or a compact .safetensors file."""
    from fxprune.report import checkpoint_sparsity

    click.echo(str(checkpoint_sparsity(checkpoint, all_parameters=all_parameters)))


@cli.command()
@click.option("--model", "model_spec", required=True, metavar="SPEC", help=_MODEL_HELP)
@click.option("--config", type=click.Path(dir_okay=False),
              help="Prune to this config's targets first (one-shot magnitude, no training).")
@click.option("--input-shape", metavar="SHAPE", help="Example input shape, e.g. 1,3,224,224 (hf: batch,tokens).")
@click.option("--threads", type=click.IntRange(min=1), help="torch.set_num_threads before measuring.")
@click.option("--repeats", type=click.IntRange(min=1), default=9, show_default=True, help="Timing rounds per layer.")
@click.option("--no-measure", is_flag=True, help="Skip timing: MACs, bytes, patterns and 2:4 eligibility only.")
@click.option("--markdown", is_flag=True, help="Print the table as Markdown.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Save latency per layer (PNG).")
def speedup(model_spec: str, config: str | None, input_shape: str | None, threads: int | None, repeats: int,
            no_measure: bool, markdown: bool, plot_path: str | None) -> None:
    """Per-layer speed-up report: MACs, bytes dense vs compact, dense vs sparse-kernel latency, verdict."""
    import torch

    from fxprune.check import prune_to_targets
    from fxprune.model_spec import example_input, parse_shape
    from fxprune.speedup import speedup_report

    try:
        shape = parse_shape(input_shape) if input_shape else None
    except ValueError as e:
        raise click.BadParameter(_one_line(e), param_hint="--input-shape") from None
    model = _model(model_spec)
    try:
        example = example_input(model, model_spec, shape)
    except ValueError as e:
        raise click.BadParameter(_one_line(e), param_hint="--input-shape") from None
    if threads:
        torch.set_num_threads(threads)
    if config:
        model = prune_to_targets(model, config, example_inputs=example)
    result = speedup_report(model, example, measure=not no_measure, repeats=repeats)
    click.echo(result.to_markdown() if markdown else str(result))
    if plot_path:
        result.plot(plot_path)
        click.echo(f"plot saved to {plot_path}")


def main() -> None:
    """Entry point of the ``fxprune`` script and ``python -m fxprune``."""
    cli.main(prog_name="fxprune")
