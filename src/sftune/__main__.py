import sys

from sftune.cli import main

sys.exit(main())
