import sys

from fm_engine.cli import main

sys.exit(main())
