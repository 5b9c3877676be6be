"""`python -m charlm ...` and `torchrun ... -m charlm train ...` enter here."""

from charlm.cli import main

if __name__ == "__main__":
    main()
