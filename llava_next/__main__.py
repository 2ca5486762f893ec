"""`python -m llava_next`: the `llava-next` command."""

from .cli import main

raise SystemExit(main())
