import sys

from greg.cli import main

sys.exit(main())
