"""Run each test file in its own pytest process, then print the totals.

MindSpore keeps every graph it compiles for the life of a process; one process per file keeps the suite's
memory at what one file needs instead of the sum of all of them.

    python tests/run_suite.py [pytest options, e.g. -m "not slow"]
"""

import re
import subprocess
import sys
import time
from pathlib import Path

COUNTS = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)")
NO_TESTS = 5  # pytest's exit status when a file's tests are all deselected


def main(options: list[str]) -> int:
    files = sorted(str(p) for p in (Path(__file__).resolve().parent).glob("test_*.py"))
    totals = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    broken = []
    start = time.monotonic()
    for file in files:
        process = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *options, file],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = process.stdout.rstrip().splitlines()
        summary = lines[-1] if lines else ""
        for count, kind in COUNTS.findall(summary):
            key = "error" if kind.startswith("error") else kind if kind in totals else "passed"
            totals[key] += int(count)
        if process.returncode not in (0, NO_TESTS):
            broken.append(file)
            print(process.stdout, flush=True)
        print(f"{Path(file).name}: {summary.strip('= ')}", flush=True)
    minutes = (time.monotonic() - start) / 60
    if broken:
        print(f"failing files: {', '.join(Path(f).name for f in broken)}")
    print(f"suite: {minutes:.1f} min")
    print(f"total: {totals['passed']} passed, {totals['failed'] + totals['error']} failed, {totals['skipped']} skipped")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
