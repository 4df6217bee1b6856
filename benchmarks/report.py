"""What every benchmark writes: figures plus the environment, as JSON and a markdown table that the
README quotes between `<!-- results:NAME -->` markers."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def environment() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return {
        "commit": commit.stdout.strip() or None,
        "python": platform.python_version(),
        "cpu_cores": os.cpu_count(),
        "cpu": cpu_model(),
        **{name: metadata.version(name) for name in ("torch", "transformers", "tyrsearch")},
    }


def cpu_model() -> str:
    """The CPU's model name where Linux tells it: machines of one core count differ in speed by 2x."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.is_file() else []
    return names[0] if names else platform.processor() or platform.machine()


def load(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def save(name: str, data: dict, table: str) -> None:
    """Write results/NAME.json and results/NAME.md atomically, and refresh the README's copy of the table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(data, indent=2) + "\n"), (".md", table)):
        tmp = RESULTS / f".{name}{suffix}.tmp"
        tmp.write_text(text)
        tmp.replace(RESULTS / f"{name}{suffix}")
    readme = ROOT / "README.md"
    if readme.exists():
        pattern = re.compile(rf"(<!-- results:{name} -->\n).*?(<!-- /results:{name} -->)", re.S)
        readme.write_text(pattern.sub(lambda m: m.group(1) + table + m.group(2), readme.read_text()))


def shared_search(out: Path, target: float, *, space: str | None = None) -> Path:
    """A SmolLM2 search run folder as benchmarks/search.py makes it (seed 0, 32 calibration sequences):
    reused when finished, resumed when interrupted, made otherwise."""
    import tyrsearch  # here, not at the top: report.py's other helpers need no torch

    if not (out / "result.json").is_file():
        tyrsearch.search("smollm2-135m", target=target, out=out, calib_seqs=32, space=space, seed=0,
                         resume=(out / "study.db").exists())
    return out
