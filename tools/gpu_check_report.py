"""Summarise one stage of tools/gpu_check.sh: summary.json and summary.md in the stage's folder.

Reads what the stage left there: `commands.tsv` (name, exit status, seconds, log per command), pytest's
junit XML files and the benchmarks' JSON (`bench_*.json`, each with a `results` list or mapping of
rows). Only reads files, so it runs anywhere (and in CI, on a stage folder made there).

    python tools/gpu_check_report.py runs/gpu_check/stage1 --stage 1
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any


def commands(folder: Path) -> list[dict[str, Any]]:
    rows = []
    for line in (folder / "commands.tsv").read_text().splitlines():
        name, rc, seconds, log = line.split("\t")
        status = {0: "passed", 124: "timed out", 137: "killed (timeout)"}.get(int(rc), f"failed (exit {rc})")
        rows.append({"name": name, "exit": int(rc), "status": status, "seconds": int(seconds), "log": log})
    return rows


def junit(folder: Path) -> dict[str, dict[str, int]]:
    """Per junit file: tests, failures, errors, skipped (pytest writes one <testsuite>)."""
    out = {}
    for path in sorted(folder.glob("*.xml")):
        suite = ET.parse(path).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        out[path.stem] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return out


def benchmarks(folder: Path) -> dict[str, Any]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("bench_*.json"))}


def _rows(payload: Any) -> list[dict[str, Any]]:
    results = payload.get("results", []) if isinstance(payload, dict) else []
    if isinstance(results, dict):
        return [{"run": key, **value} for key, value in results.items() if isinstance(value, dict)]
    return [r for r in results if isinstance(r, dict)]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def markdown(summary: dict[str, Any]) -> str:
    lines = [f"## GPU check, stage {summary['stage']}", "", "| command | status | seconds |", "|---|---|---|"]
    lines += [f"| {c['name']} | {c['status']} | {c['seconds']} |" for c in summary["commands"]]
    if summary["tests"]:
        lines += ["", "| tests | run | failed | errors | skipped |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {t['tests']} | {t['failures']} | {t['errors']} | {t['skipped']} |"
                  for name, t in summary["tests"].items()]
    for name, payload in summary["benchmarks"].items():
        rows = _rows(payload)
        if not rows:
            continue
        keys = [k for k in rows[0] if not isinstance(rows[0][k], (dict, list))]
        machine = payload.get("machine", {}).get("gpu") or payload.get("device", "")
        lines += ["", f"{name} ({machine})", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_cell(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--stage", required=True)
    args = parser.parse_args(argv)
    summary = {"stage": args.stage, "commands": commands(args.folder), "tests": junit(args.folder),
               "benchmarks": benchmarks(args.folder)}
    summary["passed"] = all(c["exit"] == 0 for c in summary["commands"]) and \
        all(t["failures"] == 0 and t["errors"] == 0 for t in summary["tests"].values())
    (args.folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = markdown(summary)
    (args.folder / "summary.md").write_text(text)
    print(text)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
