"""Task LightningModules: one per field, all driven by LightningCLI (``python -m tasks.<name>``)."""
