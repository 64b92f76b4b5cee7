"""Entry point of the `inference` process: `python -m services.inference`."""

from services.inference.service import main

if __name__ == "__main__":
    main()
