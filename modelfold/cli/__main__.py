"""``python -m modelfold.cli``."""

import sys

from .commands import main

if __name__ == "__main__":  # importing this module (e.g. pkgutil.walk_packages) runs nothing
    sys.exit(main())
