"""`python -m jobs COMMAND ...` is the same as `patchcore COMMAND ...`."""

from jobs.cli import main

if __name__ == "__main__":
    main()
