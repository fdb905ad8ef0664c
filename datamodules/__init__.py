"""LightningDataModules reading each field's standard on-disk format, plus synthetic default data."""
