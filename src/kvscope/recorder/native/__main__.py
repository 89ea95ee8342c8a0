"""Build the recorder's native fast path: `python -m kvscope.recorder.native`."""

from kvscope.recorder.native import main

raise SystemExit(main())
