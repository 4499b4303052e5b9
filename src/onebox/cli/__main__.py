"""`python -m onebox.cli`: the same as the `onebox` command."""

import sys

from onebox.cli import main

sys.exit(main())
