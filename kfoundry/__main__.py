import sys

from kfoundry.cli import main

sys.exit(main())
