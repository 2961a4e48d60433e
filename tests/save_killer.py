"""A fork server for the kill test of ``Run.save`` (tests/test_reliability.py).

Started once; imports the saving code once. For each ``go`` line on stdin it forks a child that
loads runs A and B and saves them over TARGET in turn, forever, printing ``ready PID`` first;
the test kills the child with SIGKILL at a random moment, and this process reaps it and prints
``done``. Forking spares each try the interpreter's start-up (seconds on a busy machine).

    python save_killer.py RUN_A RUN_B TARGET
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    run_a, run_b, target = sys.argv[1:4]
    import probe.analysis.run as prun  # imported before forking: the children share it

    for line in sys.stdin:
        if line.strip() != "go":
            break
        pid = os.fork()
        if pid == 0:  # the child: save A and B over the target until killed
            runs = [prun.load(run_a), prun.load(run_b)]
            print(f"ready {os.getpid()}", flush=True)
            i = 0
            while True:
                runs[i % 2].save(target)
                i += 1
        os.waitpid(pid, 0)
        print("done", flush=True)


if __name__ == "__main__":
    main()
