"""Two lab reports' main tables side by side, column by column, for the figures that do not depend on timing: the
check that a change meant to save time left every accuracy figure as it was. Reads the first table whose header
starts `| variant | method |` in each file: a run's report.md, or a results file that quotes one
(benchmarks/results/lab_smollm2_*.md), so a run whose results.json is gone can still be compared
(benchmarks/compare_runs.py compares two results.json in full).

    python benchmarks/compare_lab_tables.py OLD.md NEW.md

Prints one markdown table: per variant and figure, old and new, `=` where the text is identical, then how many
cells differ. Timed columns (tok/s, ratios, TTFT, peak memory, compress time) are left out.
"""

from __future__ import annotations

import sys
from pathlib import Path

UNTIMED = ("size (MB)", "perplexity", "KL vs baseline (nats/token)", "top-1 agreement (%)")
UNTIMED_SUFFIX = ("acc (%)", "acc_norm (%)", "avg recovery (% [95% CI])")


def main_table(path: Path) -> tuple[list[str], dict[str, dict[str, str]]]:
    lines = path.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("| variant | method |")), None)
    if start is None:
        raise SystemExit(f"{path}: no table whose header starts '| variant | method |'")
    header = [c.strip() for c in lines[start].strip().strip("|").split(" | ")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        rows[cells[0]] = dict(zip(header, cells))
    return header, rows


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__)
        return 2
    old_path, new_path = Path(sys.argv[1]), Path(sys.argv[2])
    header, old = main_table(old_path)
    _, new = main_table(new_path)
    cols = [h for h in header if h in UNTIMED or h.endswith(UNTIMED_SUFFIX)]
    print(f"old: {old_path}\nnew: {new_path}\n")
    print("| variant | figure | old | new | same |\n|---|---|---|---|---|")
    differ = total = 0
    for name in old:
        if name not in new:
            print(f"| {name} | (missing in new) | | | |")
            continue
        for c in cols:
            a, b = old[name].get(c, "—"), new[name].get(c, "—")
            total += 1
            differ += a != b
            print(f"| {name} | {c} | {a} | {b} | {'=' if a == b else 'DIFFERS'} |")
    print(f"\n{total - differ} of {total} cells identical, {differ} differ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
