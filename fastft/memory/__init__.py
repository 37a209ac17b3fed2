"""Memory accounting: the peak GPU memory of a QLoRA training step, computed on a CPU (see ``accounting``)."""
