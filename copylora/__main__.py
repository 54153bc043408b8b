import sys

from copylora.cli import main

sys.exit(main())
