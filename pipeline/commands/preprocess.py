"""``s2 preprocess``: mesh corpus -> sparse SDF shards on the current Ray cluster."""

from __future__ import annotations

from pipeline import config


def register(sub) -> None:
    p = sub.add_parser("preprocess", help="mesh corpus -> narrow-band sparse SDF Parquet shards (Ray Data)")
    config.later(p, _arguments)
    p.set_defaults(func=_run, check=_check)


def _arguments(p) -> None:
    from pipeline.preprocess import PreprocessConfig

    config.add_arguments(p, PreprocessConfig)
    p.add_argument("--no-progress", action="store_true", help="hide Ray Data's progress bars")


def _check(args) -> None:
    """Validate the settings of a job spec's entrypoint on the submitting machine."""
    from pipeline.preprocess import PreprocessConfig

    if getattr(args, "config", None):
        return  # the YAML file lives on the cluster; it is checked there before work starts
    config.from_args(PreprocessConfig, args).validate()


def _run(args) -> int:
    from pipeline.preprocess import PreprocessConfig, print_summary, run

    cfg = config.from_args(PreprocessConfig, args)
    cfg.validate()  # before Ray starts: a wrong setting costs nothing
    from pipeline.storage import check_writable

    check_writable(cfg.output, cfg.storage_options)  # nor does an output that cannot be written
    result = run(cfg, progress=not args.no_progress)
    print_summary(result, cfg)
    return 0
