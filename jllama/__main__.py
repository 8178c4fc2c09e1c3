import sys

from jllama.cli.main import main

sys.exit(main())
