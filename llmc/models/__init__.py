"""The reference PyTorch model over a checkpoint (calibration, evaluation, parity)."""
