"""Entry point of the `train` process: `python -m services.train`."""

from services.train.service import main

if __name__ == "__main__":
    main()
