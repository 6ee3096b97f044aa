"""One file per architecture family; each loads HF checkpoints as HF saved them."""
