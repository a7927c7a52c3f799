import sys

from .cli import main  # the entry point (nothing else in the package imports the command line)

sys.exit(main())
