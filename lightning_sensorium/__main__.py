"""`python -m lightning_sensorium ...` is the same CLI as `lightning-sensorium ...`."""

from lightning_sensorium.cli import main

if __name__ == "__main__":
    main()
