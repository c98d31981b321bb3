import sys

from prefnb.cli import main

sys.exit(main())
