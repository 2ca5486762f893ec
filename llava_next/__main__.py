"""`python -m llava_next`: the `llava-next` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
