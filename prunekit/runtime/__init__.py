"""Where and how the model runs: devices and offload, model state save/restore, progress, offline assets, atomic
writes."""
