import sys

from qdiablo.cli import main

sys.exit(main())
