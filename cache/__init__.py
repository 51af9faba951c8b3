"""The zarr activation cache: layout, key, commit protocol, lock, verify and reader."""
