import sys

from dmoe_cli.main import main

sys.exit(main())
