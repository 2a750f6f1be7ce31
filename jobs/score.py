"""Ray Job entrypoint: score a table. Same flags as `fimood score`.

ray job submit --working-dir . -- python jobs/score.py --detector DETECTOR --data URL --out URL
"""

import sys

from fimood.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
