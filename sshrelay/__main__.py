"""`python -m sshrelay` is the `relay` command."""

import sys

from sshrelay.cli import main

sys.exit(main())
