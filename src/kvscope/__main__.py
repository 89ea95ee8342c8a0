import sys

from kvscope.cli.main import main

sys.exit(main())
