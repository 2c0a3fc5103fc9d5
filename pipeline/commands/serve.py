"""``s2 serve``: start the image -> mesh Serve app on the current Ray cluster (HTTP API + Python handles)."""
from __future__ import annotations

from pipeline import config


HELP = {"route_prefix": "HTTP path the API is served under", "port": "HTTP proxy port",
        "num_replicas": "generator replicas", "num_cpus": "CPUs per generator replica",
        "max_ongoing_requests": "requests one replica holds at a time; more wait in the proxy",
        "max_upload_mb": "largest request body accepted (413 beyond)",
        "max_image_side": "longest image side accepted (413 beyond)",
        "default_format": "mesh format of a request that names none: glb, obj or ply"}


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the generation cascade (Ray Serve, HTTP API, dynamic batching)")
    config.later(p, _arguments)
    p.set_defaults(func=_run, check=_check)


def _arguments(p) -> None:
    from pipeline.serve.config import ServeConfig

    config.add_arguments(p, ServeConfig, helps=HELP)
    p.add_argument("--serve-config", metavar="FILE",
                   help="a Serve config file (jobs/serve.yaml); its application's args are the settings")
    p.add_argument("--detach", action="store_true", help="return once the app is running (default: block)")


def load(args):
    from pipeline.serve.config import ServeConfig, load_serve_config_file

    if getattr(args, "serve_config", None):
        cfg = load_serve_config_file(args.serve_config, args.name)
        overrides = {k: v for k, v in vars(args).items() if k in config.to_dict(cfg) and v is not None}
        return config.from_dict(ServeConfig, {**config.to_dict(cfg), **overrides}, where="ServeConfig")
    return config.from_args(ServeConfig, args)


def _check(args) -> None:
    if getattr(args, "config", None) or getattr(args, "serve_config", None):
        return  # the file lives on the cluster; it is checked there before the app starts
    load(args)


def connect() -> None:
    """Join the cluster named by RAY_ADDRESS (a GCS address; a dashboard URL means this machine's cluster)."""
    from pipeline.commands import cluster

    cluster.connect(log_to_driver=False)


def _run(args) -> int:
    import time

    from pipeline.serve.app import start

    cfg = load(args)
    connect()
    start(cfg)
    print(f"serving app {cfg.name!r} at http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}/v1/generate", flush=True)
    if args.detach:
        return 0
    while True:  # a RayJob entrypoint keeps the app's job alive while it serves
        time.sleep(3600)
