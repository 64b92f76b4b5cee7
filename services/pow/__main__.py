"""Entry point of the `pow` process: `python -m services.pow`."""

from services.pow.service import main

if __name__ == "__main__":
    main()
