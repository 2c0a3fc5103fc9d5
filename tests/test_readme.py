"""The newcomer's path: every shell block of README.md and docs/*.md meant to be run, in order, as written.

A block is run when its fence says ``bash``, ``sh`` or ``shell`` (or nothing) and the line before it is not an
HTML comment ``<!-- not run: reason -->``; diagrams and listings are fenced ``text`` or ``console``. The blocks
of one page run in one shell (an ``export`` holds for the page's later blocks), pages one after another in a
fresh folder holding links to ``jobs/`` and ``cluster/``, with a fresh HOME and no Ray variables set, inside
their own PID and network namespaces (a cluster on the default ports, torn down with the namespace). A block
that fails fails the test, naming the page, the line and the output.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
SHELLS = ("bash", "sh", "shell", "")
NOT_RUN = re.compile(r"^<!--\s*not run:\s*\S.*-->\s*$")
FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)")


@dataclass
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    info: str
    text: str
    skipped: str | None  # the not-run reason


def blocks(page: str) -> list[Block]:
    lines = (ROOT / page).read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info = m.group(1), m.group(2).lower()
        j = i + 1
        while j < len(lines) and not lines[j].startswith(fence):
            j += 1
        prev = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        reason = prev if NOT_RUN.match(prev) else None
        out.append(Block(page, i + 1, info, "\n".join(lines[i + 1:j]), reason))
        i = j + 1
    return out


def runnable(page: str) -> list[Block]:
    return [b for b in blocks(page) if b.info in SHELLS and b.skipped is None]


def test_every_shell_block_is_run_or_says_why_not():
    """A block fenced without a language must be a shell block (or say ``text``): nothing is left ambiguous."""
    for page in PAGES:
        for b in blocks(page):
            if b.info == "" and b.skipped is None:
                first = b.text.strip().splitlines()[0] if b.text.strip() else ""
                assert re.match(r"^[\w./~$-]", first) and not re.search(r"[─►│▼]", b.text), (
                    f"{page}:{b.line}: a diagram or listing in an unlabelled fence: write ```text")


def _script(page_blocks: list[Block]) -> str:
    parts = ["set -eo pipefail", 'trap \'echo "::failed $S2_BLOCK (exit $?)" >&2\' ERR']
    for b in page_blocks:
        parts += [f"S2_BLOCK='{b.page}:{b.line}'", f'echo "::block $S2_BLOCK" >&2', b.text]
    return "\n".join(parts) + "\n"


def _namespace_prefix() -> list[str] | None:
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        return None
    # --kill-child: a page that times out takes its whole namespace (cluster included) with it
    prefix = ["unshare", "--pid", "--net", "--fork", "--mount-proc", "--kill-child"]
    probe = subprocess.run([*prefix, "true"], capture_output=True)
    return prefix if probe.returncode == 0 else None


@pytest.mark.integration
@pytest.mark.timeout(960)  # 4.5-6 min on a quiet 2-core machine; more than 10 under heavy load
def test_documented_commands_run_in_order(tmp_path):
    prefix = _namespace_prefix()
    if prefix is None:
        pytest.skip("needs root and unshare: the documented cluster listens on Ray's default ports")
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    for name in ("jobs", "cluster", ".venv"):
        if (ROOT / name).exists():
            (work / name).symlink_to(ROOT / name)
    bindir = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "S2_"))}
    env.update(HOME=str(home), PATH=bindir + os.pathsep + env.get("PATH", ""), OMP_NUM_THREADS="1",
               RAY_USAGE_STATS_ENABLED="0", RAY_DATA_DISABLE_PROGRESS_BARS="1", PYTHONPATH=str(ROOT))
    ran = []
    for page in PAGES:
        page_blocks = runnable(page)
        if not page_blocks:
            continue
        script = work / f".{Path(page).stem}.sh"
        script.write_text(_script(page_blocks))
        cmd = [*prefix, "bash", "-c", f"ip link set lo up && exec bash {script}"]
        res = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
        failed = re.findall(r"::failed (\S+)", res.stderr)
        assert res.returncode == 0, (f"{failed[-1] if failed else page}: a documented command failed (exit "
                                     f"{res.returncode})\n--- stdout\n{res.stdout[-4000:]}\n--- stderr\n"
                                     f"{res.stderr[-6000:]}")
        ran += [f"{b.page}:{b.line}" for b in page_blocks]
    assert any(r.startswith("docs/cluster.md") for r in ran), ran
