"""``s2 image build|set|show|check``: the container image of every cluster and job manifest, from one setting.

``cluster/image.yaml`` names the repository and the tag; the CPU and GPU flavours are ``REPO:TAG-cpu`` and
``REPO:TAG-gpu``, both built from ``cluster/Dockerfile``. ``set`` writes the setting and patches the ``image:``
field of every manifest in ``cluster/`` and ``jobs/`` (comments and layout kept); ``build`` builds, tags (and
with ``--push`` pushes) the images and patches the manifests to name them; ``check`` fails when a manifest names
another image.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SETTING = "cluster/image.yaml"
MANIFESTS = ("cluster", "jobs")
FLAVOURS = {
    "cpu": {"BASE": "rayproject/ray:2.60.0-py311-cpu", "TORCH_INDEX": "https://download.pytorch.org/whl/cpu"},
    "gpu": {"BASE": "rayproject/ray:2.60.0-py311-gpu", "TORCH_INDEX": "https://download.pytorch.org/whl/cu128"},
}
# an `image:` field (a list item or a key) whose tag ends in a flavour: ours
IMAGE_LINE = re.compile(r"^(?P<lead>\s*(?:-\s+)?image:\s*)(?P<q>[\"']?)(?P<image>[^\s\"'#]+?-(?P<flavour>cpu|gpu))"
                        r"(?P=q)(?=\s|$)", re.M)


def register(sub) -> None:
    p = sub.add_parser("image", help="build the container image and name it in every cluster/ and jobs/ manifest")
    p.add_argument("action", choices=["build", "set", "show", "check"],
                   help="build: docker build + tag (+ --push) and patch the manifests; set: change the setting and "
                        "patch; show: the images and where they are named; check: fail if a manifest differs")
    p.add_argument("--repository", help=f"image repository, e.g. ghcr.io/you/s2ray (default: {SETTING})")
    p.add_argument("--tag", help=f"image tag without the flavour suffix, e.g. 0.2.0 (default: {SETTING})")
    p.add_argument("--flavour", choices=["cpu", "gpu", "all"], default="all", help="which images to build")
    p.add_argument("--push", action="store_true", help="push the built images")
    p.add_argument("--dry-run", action="store_true", help="print the docker commands instead of running them")
    p.add_argument("--root", default=str(ROOT), help="the checkout holding cluster/ and jobs/ (default: this one)")
    p.set_defaults(func=_run)


def read_setting(root: Path) -> dict[str, str]:
    from pipeline.config import ConfigError, read_yaml_mapping

    doc = read_yaml_mapping(root / SETTING, SETTING, "a mapping with repository and tag")
    unknown = sorted(set(doc) - {"repository", "tag"})
    if unknown or not all(isinstance(doc.get(k), str) and doc[k] for k in ("repository", "tag")):
        raise ConfigError(f"{SETTING}: expected the keys repository and tag (strings), got {sorted(doc)}")
    return {"repository": doc["repository"], "tag": doc["tag"]}


def images(setting: dict[str, str]) -> dict[str, str]:
    return {f: f"{setting['repository']}:{setting['tag']}-{f}" for f in FLAVOURS}


def manifests(root: Path) -> list[Path]:
    return sorted(p for d in MANIFESTS for p in (root / d).glob("*.yaml") if p.name != Path(SETTING).name)


def named_images(root: Path) -> dict[str, set[str]]:
    """Every image a manifest names, with the manifests that name it."""
    found: dict[str, set[str]] = {}
    for path in manifests(root):
        for m in IMAGE_LINE.finditer(path.read_text()):
            found.setdefault(m["image"], set()).add(str(path.relative_to(root)))
    return found


def patch(root: Path, setting: dict[str, str]) -> list[str]:
    """Point every manifest's image fields at the setting's images; returns the files changed."""
    want = images(setting)
    changed = []
    for path in manifests(root):
        text = path.read_text()
        new = IMAGE_LINE.sub(lambda m: f"{m['lead']}{m['q']}{want[m['flavour']]}{m['q']}", text)
        if new != text:
            tmp = path.with_suffix(".yaml.tmp")
            tmp.write_text(new)
            tmp.replace(path)
            changed.append(str(path.relative_to(root)))
    return changed


def write_setting(root: Path, setting: dict[str, str]) -> None:
    path = root / SETTING
    lines = [line for line in path.read_text().splitlines() if line.startswith("#")] if path.exists() else []
    lines += [f"repository: {setting['repository']}", f"tag: \"{setting['tag']}\""]
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def build_commands(root: Path, setting: dict[str, str], flavours: list[str], push: bool) -> list[list[str]]:
    cmds = []
    for f in flavours:
        args = [a for k, v in FLAVOURS[f].items() for a in ("--build-arg", f"{k}={v}")]
        cmds.append(["docker", "build", "-f", str(root / "cluster" / "Dockerfile"), *args, "-t", images(setting)[f],
                     str(root)])
        if push:
            cmds.append(["docker", "push", images(setting)[f]])
    return cmds


def _run(args) -> int:
    root = Path(args.root)
    setting = read_setting(root)
    if args.repository or args.tag:
        if args.action not in ("set", "build"):
            print(f"s2 image {args.action}: --repository/--tag go with `set` or `build`", file=sys.stderr)
            return 2
        setting = {"repository": args.repository or setting["repository"], "tag": args.tag or setting["tag"]}
    want = images(setting)
    if args.action == "show":
        for flavour, image in want.items():
            print(f"{flavour}: {image}")
        for image, where in sorted(named_images(root).items()):
            print(f"  {image}{'' if image in want.values() else '  (differs from the setting)'}: "
                  f"{', '.join(sorted(where))}")
        return 0
    if args.action == "check":
        wrong = {i: w for i, w in named_images(root).items() if i not in want.values()}
        for image, where in sorted(wrong.items()):
            print(f"s2 image check: {', '.join(sorted(where))} name {image}, not {SETTING}'s "
                  f"{' or '.join(want.values())}; run `s2 image set`", file=sys.stderr)
        return 1 if wrong else 0
    if args.action == "build":
        flavours = list(FLAVOURS) if args.flavour == "all" else [args.flavour]
        for cmd in build_commands(root, setting, flavours, args.push):
            print("+ " + shlex.join(cmd), flush=True)
            if not args.dry_run and subprocess.call(cmd) != 0:
                print(f"s2 image build: `{shlex.join(cmd[:2])}` failed; the manifests are unchanged", file=sys.stderr)
                return 1
        if args.dry_run:
            return 0
    if not args.dry_run:
        write_setting(root, setting)
        changed = patch(root, setting)
        print(f"{SETTING}: {want['cpu']}, {want['gpu']}; manifests updated: {', '.join(changed) or 'none needed'}")
    return 0
