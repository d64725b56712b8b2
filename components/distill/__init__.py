"""distill: train a small student from the cached teacher outputs (see `train.py`)."""
