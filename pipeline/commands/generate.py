"""``s2 generate``: images (folder, manifest or s3:// prefix) -> an asset library through the Serve app."""
from __future__ import annotations

from pipeline import config


HELP = {"format": "mesh format of the library: glb, obj or ply", "preview_size": "preview image side in pixels",
        "request_timeout_s": "seconds one generation may take before it is recorded as failed",
        "title": "title of gallery.html"}


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate an asset library (meshes, previews, index, gallery) via Ray Serve")
    config.later(p, _arguments)
    p.set_defaults(func=_run, check=_check)


def _arguments(p) -> None:
    from pipeline.generate import GenerateConfig

    config.add_arguments(p, GenerateConfig, helps=HELP)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _check(args) -> None:
    from pipeline.generate import GenerateConfig

    if getattr(args, "config", None):
        return
    config.from_args(GenerateConfig, args)


def ensure_app(cfg):
    """The Generator handle of the running app, starting it from ``cfg.serve_config`` when it is not running."""
    from ray import serve

    from pipeline.config import ConfigError
    from pipeline.serve.app import generator_handle, generator_status_reason, start
    from pipeline.serve.config import load_serve_config_file

    running = cfg.app_name in serve.status().applications if serve.context._get_global_client(
        raise_if_no_controller_running=False) else False
    if not running:
        if not cfg.serve_config:
            raise ConfigError(f"app_name: no Serve app {cfg.app_name!r} is running; pass --serve-config jobs/serve.yaml")
        scfg = load_serve_config_file(cfg.serve_config, cfg.app_name)
        print(f"starting Serve app {cfg.app_name!r} from {cfg.serve_config}", flush=True)
        start(scfg)
    why = generator_status_reason(cfg.app_name)
    if why:  # a failed deploy: calls would wait for a replica that never comes
        raise ConfigError(f"Serve app {cfg.app_name!r}: {why} (`serve status` shows it)")
    return generator_handle(cfg.app_name)


def _run(args) -> int:
    from pipeline.commands.serve import connect
    from pipeline.generate import GenerateConfig, print_summary, run

    cfg = config.from_args(GenerateConfig, args)
    from pipeline.storage import check_writable

    check_writable(cfg.output, cfg.storage_options)  # before the cluster and any image work
    connect()
    handle = ensure_app(cfg)
    info = handle.info.remote().result()
    summary = run(cfg, handle, info, progress=not args.no_progress)
    print_summary(summary)
    return 0 if summary["generated"] + summary["skipped"] > 0 or summary["items"] == 0 else 1
