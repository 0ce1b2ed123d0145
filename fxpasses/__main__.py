import sys

from fxpasses.cli import main

sys.exit(main())
