"""Ray Job entrypoint: fit a detector. Same flags as `fimood fit`.

ray job submit --working-dir . -- python jobs/fit.py --model CKPT --data URL --out DETECTOR
"""

import sys

from fimood.cli import main

if __name__ == "__main__":
    sys.exit(main(["fit", *sys.argv[1:]]))
