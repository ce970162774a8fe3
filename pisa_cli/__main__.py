"""``python -m pisa_cli``: the same as the ``pisa`` command."""

from pisa_cli.cli import main

if __name__ == "__main__":
    main()
