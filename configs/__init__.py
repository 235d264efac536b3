"""Experiment configs: each file's `get_config(arg)` is one setting (`--config=configs/<file>.py[:arg]`); the
pieces they share live in `configs/common.py`."""
