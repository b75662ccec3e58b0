"""`deepspeed launchers/train.py --config FILE [--set key=value ...]`: same as `gps-ds train`."""

from gps_ds.cli import launcher_main

if __name__ == "__main__":
    launcher_main("train")
