"""``python -m medadv`` (and ``torchrun -m medadv``): the command line."""

from medadv.cli import main

if __name__ == "__main__":
    main()
