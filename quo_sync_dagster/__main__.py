"""`python -m quo_sync_dagster` is the `quo-sync` command."""

import sys

from quo_sync_dagster.cli import main

sys.exit(main())
