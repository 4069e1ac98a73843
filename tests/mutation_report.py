"""`make mutation`'s summary (not a test module): the mutation score of each module mutmut mutated, and the mutants
that were not killed, from `mutmut results` in the repository root (run after `mutmut run`).

A mutant counts as killed when a test failed on it or it ran past mutmut's timeout (a test caught the hang).
Mutants judged equivalent carry a `# pragma: no mutate` comment with the reason beside the code, so mutmut does not
make them; tests/README.md says how to read the output.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

KILLED = {"killed", "timeout"}


def mutant_statuses(mutmut: str) -> dict[str, str]:
    """Mutant name (`hf_sad.box_ops.x_match_anchors__mutmut_3`) -> status (`killed`, `survived`, `no tests`, ...)."""
    output = subprocess.run([mutmut, "results", "--all", "true"], capture_output=True, text=True, check=True).stdout
    statuses = {}
    for line in output.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if name:
            statuses[name] = status
    return statuses


def module_of(mutant: str) -> str:
    """`hf_sad.box_ops` of `hf_sad.box_ops.x_match_anchors__mutmut_3` (or of a method's `...xǁClassǁname__...`)."""
    return mutant.split(".x", 1)[0]


def main() -> int:
    mutmut = str(Path(sys.executable).with_name("mutmut"))
    statuses = mutant_statuses(mutmut)
    if not statuses:
        print("No mutation results: run `mutmut run` first (make mutation does both).")
        return 1
    per_module: dict[str, Counter] = defaultdict(Counter)
    for name, status in statuses.items():
        per_module[module_of(name)][status] += 1
    print(f"{'module':<34}{'mutants':>8}{'killed':>8}{'survived':>9}{'no tests':>9}{'score':>8}")
    total = Counter()
    for module in sorted(per_module):
        counts = per_module[module]
        total.update(counts)
        killed = sum(counts[s] for s in KILLED)
        print(f"{module:<34}{sum(counts.values()):>8}{killed:>8}{counts['survived']:>9}{counts['no tests']:>9}"
              f"{100 * killed / sum(counts.values()):>7.1f}%")
    killed = sum(total[s] for s in KILLED)
    print(f"{'all':<34}{sum(total.values()):>8}{killed:>8}{total['survived']:>9}{total['no tests']:>9}"
          f"{100 * killed / sum(total.values()):>7.1f}%")
    alive = sorted(name for name, status in statuses.items() if status not in KILLED)
    if alive:
        print(f"\n{len(alive)} mutants not killed (`mutmut show NAME` shows one):")
        print("\n".join(f"  {name}: {statuses[name]}" for name in alive))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
