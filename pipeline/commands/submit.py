"""``s2 submit JOB.yaml``: run a job spec on a running Ray cluster through the job submission API."""

from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("submit", help="submit a jobs/*.yaml spec to a Ray cluster, stream logs, return its status")
    p.add_argument("spec", help="a RayJob manifest from jobs/")
    p.add_argument("--address", help="dashboard address of the cluster (default: RAY_ADDRESS)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a stage setting (appended to the entrypoint as --key value)")
    p.add_argument("--working-dir", help="upload this folder as the job's working_dir")
    p.add_argument("--no-wait", action="store_true", help="return once submitted")
    p.add_argument("--timeout", type=float, default=None, help="stop the job after this many seconds")
    p.add_argument("--dry-run", action="store_true", help="check the spec and print the entrypoint only")
    p.add_argument("--manifest", action="store_true",
                   help="check the spec and print it as a RayJob that brings its own cluster (for kubectl apply -f -)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from pipeline import jobs

    spec = jobs.with_overrides(jobs.load_job_spec(args.spec), args.overrides)
    jobs.check_entrypoint(spec)
    if args.manifest:
        import yaml

        doc = jobs.standalone_manifest(jobs.JobSpec(spec.path, spec.name, spec.entrypoint, spec.runtime_env,
                                                    {**spec.manifest, "spec": {**spec.manifest["spec"],
                                                                               "entrypoint": spec.entrypoint}}))
        print(yaml.safe_dump(doc, sort_keys=False, width=120), end="")
        return 0
    if args.dry_run:
        print(spec.entrypoint)
        return 0
    status = jobs.submit(spec, address=args.address, wait=not args.no_wait, working_dir=args.working_dir,
                         timeout_s=args.timeout)
    print(f"job {spec.name}: {status}", file=sys.stderr)
    return 0 if status in ("SUCCEEDED",) or args.no_wait else 1
