"""``python -m jtinker.server [options]``."""

from jtinker.server import main

raise SystemExit(main())
