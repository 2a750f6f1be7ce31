"""Ray Job entrypoint: nightly shift monitoring. Same flags as `fimood monitor`; exit 0 ok, 3 shift, 4 could not run.

ray job submit --working-dir . -- python jobs/monitor.py --detector D --data URL --scores URL --history URL --report URL
"""

import sys

from fimood.cli import main

if __name__ == "__main__":
    sys.exit(main(["monitor", *sys.argv[1:]]))
