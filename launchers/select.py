"""`deepspeed [--num_gpus N] launchers/select.py --config FILE [--set key=value ...] --out mask.safetensors`

Same as `gps-ds select`: under a launcher every rank scores its share of the data under the
config's ZeRO stage (no optimizer state), the per-row top-K runs per gradient shard, and rank 0
writes the mask file.
"""

from gps_ds.cli import launcher_main

if __name__ == "__main__":
    launcher_main("select")
