"""`python -m stedm <stage>`: same as the `stedm` console command."""

import sys

from stedm.cli import main

sys.exit(main())
