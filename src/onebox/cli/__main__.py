"""`python -m onebox.cli`: the same as the `onebox` command."""

import sys

from onebox.cli import main

if __name__ == "__main__":  # not when multiprocessing's spawn re-imports this module in a child process
    sys.exit(main())
