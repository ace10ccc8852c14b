"""The datasets: one module per on-disk format (each registers its builder in registry.py), returning a
RawDataset of sources (data/sources.py: in-memory tensors; data/file_source.py: image files), and the
opt-in downloads (fetch.py)."""
