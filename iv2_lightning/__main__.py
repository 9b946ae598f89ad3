"""`python -m iv2_lightning` runs the same command line as the `iv2` console script."""

from iv2_lightning.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
