import sys

from quantrain.cli import main

sys.exit(main())
